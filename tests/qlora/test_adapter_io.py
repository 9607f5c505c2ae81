"""PEFT-format adapter files: both interop directions with peft as the oracle, and validation."""

import copy
import json

import pytest
import torch
from lora_helpers import batch, logits, randomize_adapters, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from layers import AdapterLinear, DoRALinear, LoRALinear
from qlora.adapters.files import load_adapter, read_adapter, save_adapter
from qlora.lora.surgery import apply_lora, lora_modules
from quant import InputError

# (arch, variant, targets, rank_pattern, alpha_pattern): every family sees every variant
# across the two directions, with several target sets and per-module overrides.
CASES = [
    ("llama", "lora", "all-linear", None, None),
    ("llama", "rslora", ["q_proj", "v_proj"], {"layers.1.self_attn.q_proj": 8}, None),
    ("llama", "dora", "mlp", None, {"down_proj": 4.0}),
    ("qwen2", "lora", ["q_proj", "k_proj", "v_proj", "o_proj"], None, {"k_proj": 2.0}),
    ("qwen2", "rslora", "all-linear", {"mlp.up_proj": 2}, None),
    ("qwen2", "dora", ["q_proj", "v_proj"], None, None),
    ("mistral", "lora", ["gate_proj", "model.layers.0.self_attn.o_proj"], {"gate_proj": 6}, None),
    ("mistral", "rslora", "mlp", None, None),
    ("mistral", "dora", "all-linear", {"o_proj": 2}, {"o_proj": 3.0}),
]
IDS = [f"{a}-{v}-{i}" for i, (a, v, *_) in enumerate(CASES)]
PEFT_TARGETS = {"all-linear": "all-linear", "mlp": ["gate_proj", "up_proj", "down_proj"]}


@pytest.mark.parametrize("arch,variant,targets,rank_pattern,alpha_pattern", CASES, ids=IDS)
def test_qlora_adapter_loads_in_peft(tmp_path, arch, variant, targets, rank_pattern, alpha_pattern):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    apply_lora(
        model, targets, rank=4, alpha=8.0, dropout=0.05, use_rslora=variant == "rslora", use_dora=variant == "dora",
        dtype=torch.float32, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )
    randomize_adapters(model)
    model.eval()
    x = batch()
    ours = logits(model, x)
    assert (ours - logits(base, x)).abs().max() > 1e-3  # the adapter does something, so the test can fail
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny/" + arch)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "tiny/" + arch
    assert cfg["use_dora"] == (variant == "dora") and cfg["use_rslora"] == (variant == "rslora")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    theirs = logits(peft_model, x)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # PEFT wrapped exactly our modules, with our ranks and scales
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    }
    ours_mods = dict(lora_modules(model))
    assert set(peft_layers) == set(ours_mods)
    for n, pm in peft_layers.items():
        assert pm.r["default"] == ours_mods[n].rank and pm.scaling["default"] == pytest.approx(ours_mods[n].scale)


@pytest.mark.parametrize("arch,variant,targets,rank_pattern,alpha_pattern", CASES, ids=IDS)
def test_peft_adapter_loads_in_qlora(tmp_path, arch, variant, targets, rank_pattern, alpha_pattern):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05,
        target_modules=PEFT_TARGETS.get(targets, targets) if isinstance(targets, str) else targets,
        use_rslora=variant == "rslora", use_dora=variant == "dora",
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # test code may look at PEFT's names; the library never does
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    x = batch()
    theirs = logits(peft_model, x)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    report = load_adapter(model, tmp_path / "peft")
    model.eval()
    ours = logits(model, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - logits(tiny_model(arch), x)).abs().max() > 1e-3
    assert report.trainable == 0  # loaded for inference by default
    assert all(m.lora_A.weight.dtype == torch.float32 for _, m in lora_modules(model))


def test_bf16_adapter_roundtrip_and_trainable_load(tmp_path):
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=4, alpha=8.0)  # bf16 default
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(sd) == 8 and all(t.dtype == torch.bfloat16 for t in sd.values())
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    x = batch()
    same = tiny_model("llama")
    load_adapter(same, tmp_path / "ad")  # file dtype: bit-identical outputs
    assert torch.equal(logits(same, x), logits(model, x))
    other = tiny_model("llama")
    report = load_adapter(other, tmp_path / "ad", dtype=torch.float32, trainable=True)
    # 2 layers x (q, v)
    assert report.trainable == sum(m.trainable for m in report.modules) == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert all(m.lora_B.weight.dtype == torch.float32 for _, m in lora_modules(other))
    torch.testing.assert_close(logits(other, x), logits(model, x), rtol=0, atol=5e-3)  # bf16 vs fp32 adapter math


def test_partial_targets_written_as_full_names(tmp_path):
    model = tiny_model("llama")
    apply_lora(model, r"model\.layers\.0\.self_attn\.(q|v)_proj", rank=2, alpha=2.0)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    apply_lora(m2 := tiny_model("llama"), "qv", rank=2, alpha=2.0)
    save_adapter(m2, tmp_path / "ad2")
    assert json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_write_is_atomic_and_overwrites_in_place(tmp_path):
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=2, alpha=2.0)
    out = tmp_path / "ad"
    save_adapter(model, out)
    (out / "README.md").write_text("keep me")
    randomize_adapters(model)
    save_adapter(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left behind
    assert (out / "README.md").read_text() == "keep me"
    a = read_adapter(out).modules["model.layers.0.self_attn.q_proj"]
    assert torch.equal(a.lora_B, model.model.layers[0].self_attn.q_proj.lora_B.weight.detach())


def _saved(tmp_path, arch="llama"):
    model = tiny_model(arch)
    apply_lora(model, "qv", rank=4, alpha=8.0)
    save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_unknown_peft_type_is_input_error(tmp_path):
    d = _saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="peft_type 'IA3'.*'LORA'"):
        load_adapter(tiny_model("llama"), d)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    d = _saved(tmp_path)
    wider = tiny_model("llama")
    cfg = copy.deepcopy(wider.config)
    cfg.hidden_size, cfg.num_attention_heads = 128, 8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(InputError) as e:
        load_adapter(model, d)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 64)" in msg and "(4, 128)" in msg
    assert "different base model" in msg and "\n" not in msg  # one paragraph
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # nothing was changed


def test_other_bad_adapters(tmp_path):
    d = _saved(tmp_path)
    model = tiny_model("llama")
    with pytest.raises(InputError, match="not an adapter folder"):
        load_adapter(model, tmp_path / "missing")
    cfg_path = d / "adapter_config.json"
    good = cfg_path.read_text()
    for patch, match in [
        ({"r": 8}, "rank 4 but"),
        ({"use_dora": True}, "lacks its lora_magnitude_vector"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "modifies the base weights"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ]:
        cfg_path.write_text(json.dumps({**json.loads(good), **patch}))
        with pytest.raises(InputError, match=match):
            read_adapter(d)
    cfg_path.write_text(good)
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(4, 64)
    sd["base_model.model.model.layers.0.mlp.nope.lora_B.weight"] = torch.zeros(64, 4)
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="'model.layers.0.mlp.nope' is not a linear layer"):
        load_adapter(model, d)


def test_non_finite_weights_are_refused_naming_the_module(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in sorted(sd) if "layers.1" in k and "lora_B" in k)
    sd[key][0, 0] = float("nan")
    sd[key][1, 0] = float("inf")
    save_file(sd, str(d / "adapter_model.safetensors"))
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    with pytest.raises(InputError, match=rf"lora_B of module '{module}' holds 2 NaN or infinite value"):
        load_adapter(tiny_model("llama"), d)


def test_weights_that_disagree_with_target_modules_are_said(tmp_path, caplog):
    """The weights are what runs; a file cut short, or holding more than its config names, is warned about."""
    d = _saved(tmp_path)
    sd = load_file(str(d / "adapter_model.safetensors"))
    cut = {k: v for k, v in sd.items() if "layers.0." in k}
    save_file(cut, str(d / "adapter_model.safetensors"))
    with caplog.at_level("WARNING", logger="qlora.adapters.files"):
        report = load_adapter(tiny_model("llama"), d)
    n_all, n_cut = len(sd) // 2, len(cut) // 2
    assert len(report.modules) == n_cut
    assert f"targets {n_all} layers of this model" in caplog.text and f"cover {n_cut} of them" in caplog.text
    caplog.clear()
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with caplog.at_level("WARNING", logger="qlora.adapters.files"):
        load_adapter(tiny_model("llama"), d)
    assert "modules its config's target_modules (q_proj) do not name" in caplog.text


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_mode_with_dropout_matches_peft(tmp_path, use_dora):
    """Same dropout masks (same seed, one draw per module) give the same outputs and gradients as PEFT."""
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    apply_lora(model, "all-linear", rank=4, alpha=8.0, dropout=0.2, use_dora=use_dora, dtype=torch.float32)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad"), is_trainable=True)
    model.train(), peft_model.train()
    x = batch()
    torch.manual_seed(7)
    ours = model(input_ids=x, labels=x)
    torch.manual_seed(7)
    theirs = peft_model(input_ids=x, labels=x)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward(), theirs.loss.backward()
    peft_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    for name, m in lora_modules(model):
        torch.testing.assert_close(m.lora_B.weight.grad, peft_grads[f"{name}.lora_B.weight"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_A.weight.grad, peft_grads[f"{name}.lora_A.weight"], rtol=1e-4, atol=1e-6)
        if use_dora:
            torch.testing.assert_close(
                m.lora_magnitude_vector.grad, peft_grads[f"{name}.lora_magnitude_vector.weight"], rtol=1e-4, atol=1e-6
            )


def test_adapter_loaded_into_an_eval_model_applies_no_dropout(tmp_path):
    """A fresh nn.Dropout starts in training mode; loading must follow the model's mode."""
    model = tiny_model("llama")
    apply_lora(model, "all-linear", rank=4, alpha=8.0, dropout=0.5)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    fresh = tiny_model("llama").eval()
    load_adapter(fresh, tmp_path / "a")
    assert all(not m.training for m in fresh.modules())
    x = batch()
    torch.testing.assert_close(logits(fresh, x), logits(fresh, x))  # deterministic: no dropout at inference


def test_loading_dora_onto_plain_lora_layers_and_back(tmp_path):
    """A DoRA file on LoRALinear layers (and a plain file on DoRALinear ones) gets layers of its own type."""
    dora, plain = tiny_model("llama"), tiny_model("llama")
    apply_lora(dora, "qv", rank=2, alpha=4.0, use_dora=True, dtype=torch.float32)
    apply_lora(plain, "qv", rank=4, alpha=8.0, dtype=torch.float32)
    randomize_adapters(dora, seed=3), randomize_adapters(plain, seed=4)
    save_adapter(dora, tmp_path / "d"), save_adapter(plain, tmp_path / "p")
    x = batch()
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=4, alpha=8.0, dtype=torch.float32)
    q = "model.layers.0.self_attn.q_proj"
    base = model.get_submodule(q).base_layer
    load_adapter(model, tmp_path / "d")
    assert all(type(m) is DoRALinear for _, m in lora_modules(model)) and model.get_submodule(q).base_layer is base
    assert torch.equal(logits(model, x), logits(dora, x))
    load_adapter(model, tmp_path / "p")
    assert all(type(m) is LoRALinear for _, m in lora_modules(model)) and model.get_submodule(q).base_layer is base
    assert torch.equal(logits(model, x), logits(plain, x))


@pytest.mark.parametrize("fmt", [None, ("nf4", 64, True), ("fp4", 128, False)], ids=["16bit", "nf4", "fp4"])
def test_the_training_base_is_recorded_and_peft_still_loads_the_file(tmp_path, fmt):
    """The base's format goes into the weights file's metadata: read back by qlora, ignored by PEFT (no warning)."""
    import warnings

    from safetensors import safe_open

    from qlora.adapters.record import BaseRecord
    from quant import quantize_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    if fmt is not None:
        quantize_model(model, *fmt)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    want = BaseRecord("none", "bfloat16") if fmt is None else BaseRecord(fmt[0], "bfloat16", fmt[1], fmt[2])
    assert read_adapter(tmp_path / "ad").base == want
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers and PEFT check
    base = tiny_model("llama", dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]  # PEFT's warning for unknown config keys
    q = "model.layers.0.self_attn.q_proj"
    theirs = peft_model.base_model.model.get_submodule(q).lora_B["default"].weight
    assert torch.equal(theirs, model.get_submodule(q).lora_B.weight)
    if fmt is None:  # same 16-bit base: the same function, up to bf16 rounding in a different op order
        torch.testing.assert_close(logits(peft_model, batch()), logits(model, batch()), rtol=0, atol=2e-2)


def test_adapters_without_a_record_and_bad_records(tmp_path):
    base = tiny_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert read_adapter(tmp_path / "peft").base is None  # PEFT's own files: no record, not an error
    d = _saved(tmp_path)
    w = d / "adapter_model.safetensors"
    tensors = load_file(str(w))
    for bad in ('{"quant_type": "int4", "dtype": "bfloat16"}', '{"quant_type": "nf4", "dtype": "bfloat16"}', "{x"):
        save_file(tensors, str(w), metadata={"format": "pt", "qlora.base": bad})
        with pytest.raises(InputError, match="qlora.base|records a base") as e:
            read_adapter(d)
        assert "\n" not in str(e.value)


def test_serving_format_follows_the_adapters_record_unless_a_flag_says_otherwise():
    from qlora.adapters.record import BaseRecord, serving_format

    nf4 = BaseRecord("nf4", "bfloat16", 128, False)
    assert serving_format(nf4) == {"quant_type": "nf4", "blocksize": 128, "double_quant": False}
    assert serving_format(BaseRecord("none", "bfloat16")) == {"quant_type": "none"}  # a 16-bit-trained adapter
    assert serving_format(None) == {"quant_type": "nf4"}  # PEFT's adapters record nothing: qlora's default
    assert serving_format(nf4, "none") == {"quant_type": "none"}  # the flag wins (with a warning)
