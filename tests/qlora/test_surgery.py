"""Targets, model surgery, the parameter report, LoRA+ groups and diagnostics."""

import pytest
import torch
from lora_helpers import batch, logits, randomize_adapters, tiny_model
from peft.utils.other import get_pattern_key
from torch import nn

from layers import AdapterLinear, DoRALinear
from qlora.lora.diagnostics import lora_diagnostics, summarize
from qlora.lora.param_groups import lora_param_groups
from qlora.lora.surgery import apply_lora, lora_modules, lora_parameters
from qlora.lora.targets import pattern_key, resolve_targets
from quant import InputError, NF4Linear, quantize_model

LEAVES = {
    "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qv": {"q_proj", "v_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj"},
}
PHI3 = {
    "all-linear": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "attention": {"qkv_proj", "o_proj"},
    "qv": {"qkv_proj"},
    "mlp": {"gate_up_proj", "down_proj"},
}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_presets_across_families(arch):
    model = tiny_model(arch)
    for preset, leaves in (PHI3 if arch == "phi3" else LEAVES).items():
        names = resolve_targets(model, preset)
        assert {n.rsplit(".", 1)[-1] for n in names} == leaves, preset
        assert len(names) == 2 * len(leaves)  # both layers
        assert "lm_head" not in names


def test_explicit_names_suffixes_regex_and_nf4():
    model = tiny_model("llama")
    quantize_model(model, compute_dtype=torch.float32)  # NF4Linear layers are targets too
    assert resolve_targets(model, ["q_proj", "model.layers.1.mlp.down_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]
    assert resolve_targets(model, "q_proj") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    layer0 = [n for n in resolve_targets(model, "all-linear") if ".0." in n]
    assert resolve_targets(model, r".*layers\.0\..*_proj") == layer0
    assert resolve_targets(model, ["lm_head"]) == ["lm_head"]  # explicit names may pick the head


def test_unknown_target_lists_the_models_linear_names():
    model = tiny_model("phi3")
    with pytest.raises(InputError) as e:
        resolve_targets(model, ["q_proj", "v_proj"])
    msg = str(e.value)
    assert "'q_proj'" in msg and "qkv_proj" in msg and "gate_up_proj" in msg and "model.layers.0" in msg
    with pytest.raises(InputError, match="matches no linear layer"):
        resolve_targets(model, r"encoder\..*")
    with pytest.raises(InputError, match="not a valid regular expression"):
        resolve_targets(model, "q_proj(")
    with pytest.raises(InputError, match="preset"):
        apply_lora(model, targets=[])


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj": 1, "layers.1.mlp.down_proj": 2},
        {r"model\.layers\.0\..*": 3, "v_proj": 5},
        {"proj": 7, "k_proj": 8},  # 'proj' does not match 'k_proj' as a whole component
        {".*_proj": 9},
    ],
)
def test_pattern_matching_equals_peft(patterns):
    model = tiny_model("llama")
    for name in resolve_targets(model, "all-linear"):
        peft_key = get_pattern_key(patterns.keys(), name)
        ours = pattern_key(patterns, name)
        assert (ours or name) == peft_key


def test_apply_lora_in_place_names_unchanged_and_model_unchanged_at_init():
    model = tiny_model("qwen2")
    x = batch()
    before = logits(model, x)
    names_before = {n for n, m in model.named_modules()}
    report = apply_lora(model, "all-linear", rank=4, alpha=8.0, use_dora=True)
    assert torch.equal(logits(model, x), before)
    mods = dict(lora_modules(model))
    assert set(mods) <= names_before and len(mods) == 14
    assert isinstance(model.model.layers[0].self_attn.q_proj, DoRALinear)  # use_dora: DoRA's own class
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or n.endswith("lora_magnitude_vector") for n in trainable)
    assert len(trainable) == 3 * 14 and report.trainable == sum(p.numel() for p in lora_parameters(model))
    with pytest.raises(InputError, match="already has LoRA modules"):
        apply_lora(model, "mlp")


def test_parameter_count_formula_and_report():
    model = tiny_model("llama")
    quantize_model(model)
    total_before = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)
    )
    report = apply_lora(
        model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0,
        rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3.0},
    )
    expect = 0
    for m in report.modules:
        r = 6 if m.name == "model.layers.1.self_attn.q_proj" else 4
        assert m.rank == r and m.params == r * (m.in_features + m.out_features)
        assert m.alpha == (3.0 if m.name.endswith("v_proj") else 8.0)
        assert m.scale == pytest.approx(m.alpha / r)
        expect += r * (m.in_features + m.out_features)
    assert report.trainable == expect
    assert report.model_params == total_before + expect
    assert report.percent == pytest.approx(100 * expect / (total_before + expect))
    text = report.format()
    assert "model.layers.1.self_attn.q_proj" in text and f"{expect:,}" in text
    # DoRA adds d_out per module
    m2 = tiny_model("llama")
    rep2 = apply_lora(m2, "qv", rank=2, alpha=4.0, use_dora=True)
    assert rep2.trainable == sum(2 * (m.in_features + m.out_features) + m.out_features for m in rep2.modules)


def test_bad_inputs_to_apply_lora():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="rank"):
        apply_lora(model, "qv", rank=0)
    with pytest.raises(InputError, match="rank"):
        apply_lora(model, "qv", rank_pattern={"q_proj": -1})
    with pytest.raises(InputError, match="rank_pattern key 'qq_proj'"):
        apply_lora(model, "qv", rank_pattern={"qq_proj": 4})
    with pytest.raises(InputError, match="dtype"):
        apply_lora(model, "qv", dtype=torch.int8)
    with pytest.raises(InputError, match="Unknown LoRA target 'attn'"):
        apply_lora(model, ["attn"])
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # failures changed nothing


def test_parameters_found_by_type_not_by_name():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.lora_A = nn.Parameter(torch.ones(3))  # a user's own parameter with an unlucky name

    model = Block()
    apply_lora(model, ["proj"], rank=2, alpha=2.0)
    params = lora_parameters(model)
    assert len(params) == 2 and all(p is not model.lora_A for p in params)
    assert not model.lora_A.requires_grad  # frozen like the rest of the base


def test_loraplus_param_groups():
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=2, alpha=4.0, use_dora=True)
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-4, loraplus_ratio=16, weight_decay=0.1)}
    assert groups["lora_A"]["lr"] == 1e-4 and groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert groups["lora_magnitude_vector"]["lr"] == pytest.approx(16e-4)
    assert groups["lora_magnitude_vector"]["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.1
    assert all(p.shape[1] == 2 for p in groups["lora_B"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(lora_parameters(model))
    torch.optim.AdamW(list(groups.values()))  # accepted by a real optimizer
    with pytest.raises(InputError, match="loraplus_ratio"):
        lora_param_groups(model, lr=1e-4, loraplus_ratio=0)


def test_diagnostics_match_dense_computation():
    model = tiny_model("llama")
    quantize_model(model, compute_dtype=torch.float32)
    apply_lora(model, "qv", rank=4, alpha=8.0, dtype=torch.float32)
    randomize_adapters(model)
    x = batch()
    model(input_ids=x, labels=x).loss.backward()
    diags = {d.name: d for d in lora_diagnostics(model)}
    assert len(diags) == 4
    for name, m in lora_modules(model):
        d = diags[name]
        dense = m.delta_weight()
        w0 = m.base_layer.dequantize(torch.float32)
        assert d.update_norm == pytest.approx(float(dense.norm()), rel=1e-5)
        assert d.base_norm == pytest.approx(float(w0.norm()), rel=1e-6)
        assert d.update_ratio == pytest.approx(float(dense.norm() / w0.norm()), rel=1e-5)
        ga, gb = m.lora_A.weight.grad.norm(), m.lora_B.weight.grad.norm()
        assert d.grad_ratio == pytest.approx(float(ga / gb), rel=1e-6)
    s = summarize(list(diags.values()))
    assert s["update_ratio_max"] == max(d.update_ratio for d in diags.values())
