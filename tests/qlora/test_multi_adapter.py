"""Several named adapters: switching, combining (exact), arithmetic, and their files."""

import copy

import pytest
import torch
from lora_helpers import batch, logits, randomize_adapters, tiny_model
from peft import PeftModel

from layers import DoRALinear, LoRALinear
from qlora.adapters.files import load_adapter, read_adapter, save_adapter, write_adapter
from qlora.adapters.merging import merge, merge_and_unload, unmerge
from qlora.adapters.multi import (
    active_adapter,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    bank_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    set_active_adapter,
)
from qlora.lora.surgery import apply_lora, lora_modules, lora_parameters
from quant import InputError, quantize_model


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two fp32 adapters for the same tiny Llama with different targets, ranks and scale rules."""
    root = tmp_path_factory.mktemp("multi")
    m1 = tiny_model("llama")
    apply_lora(m1, "attention", rank=4, alpha=8.0, dtype=torch.float32)
    randomize_adapters(m1, seed=11)
    save_adapter(m1, root / "a")
    m2 = tiny_model("llama")
    apply_lora(m2, ["q_proj", "down_proj"], rank=2, alpha=4.0, use_rslora=True, dtype=torch.float32)
    randomize_adapters(m2, seed=12)
    save_adapter(m2, root / "b")
    return root


def _single(path, nf4=False):
    model = tiny_model("llama")
    if nf4:
        quantize_model(model, compute_dtype=torch.float32)
    load_adapter(model, path)
    return model


def test_switch_active_adapter(two_adapters):
    root = two_adapters
    x = batch()
    ref_a, ref_b = logits(_single(root / "a"), x), logits(_single(root / "b"), x)
    base_logits = logits(tiny_model("llama"), x)
    model = tiny_model("llama")
    add_adapter(model, "a", root / "a")
    add_adapter(model, "b", root / "b")
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"
    assert torch.equal(logits(model, x), ref_a)
    set_active_adapter(model, "b")
    assert torch.equal(logits(model, x), ref_b)  # k_proj etc. (only in "a") pass through now
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base_logits)
    set_active_adapter(model, "a")
    assert torch.equal(logits(model, x), ref_a)
    with pytest.raises(InputError, match="No adapter named 'c'; loaded adapters: 'a' or 'b'"):
        set_active_adapter(model, "c")
    with pytest.raises(InputError, match="already loaded"):
        add_adapter(model, "a", root / "b")
    with pytest.raises(InputError, match="is active"):
        delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]


def test_disable_adapters_holds_across_a_switch(two_adapters):
    root, x = two_adapters, batch()
    base_logits, ref_a, ref_b = logits(tiny_model("llama"), x), logits(_single(root / "a"), x), logits(
        _single(root / "b"), x)
    model = tiny_model("llama")
    add_adapter(model, "a", root / "a")
    add_adapter(model, "b", root / "b")
    with disable_adapters(model):
        set_active_adapter(model, "b")
        assert torch.equal(logits(model, x), base_logits)  # the switched-in adapter stays off inside the block
    assert torch.equal(logits(model, x), ref_b)  # and runs once the block ends
    set_active_adapter(model, "a")
    assert torch.equal(logits(model, x), ref_a)  # the adapter banked inside the block was re-enabled too


def test_training_the_active_adapter_survives_switching(two_adapters):
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=2, alpha=2.0, dtype=torch.float32)  # becomes "default"
    randomize_adapters(model)
    params = [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    add_adapter(model, "a", two_adapters / "a")
    assert active_adapter(model) == "default" and adapter_names(model) == ["default", "a"]
    x = batch()
    before = logits(model, x)
    set_active_adapter(model, "a")
    set_active_adapter(model, "default")
    now = [p for _, m in lora_modules(model) if m.lora_A is not None for p in (m.lora_A.weight, m.lora_B.weight)]
    # same objects: optimizer refs stay valid
    assert all(p is q for p, q in zip(params, now)) and len(now) == len(params)
    assert torch.equal(logits(model, x), before)


def _delta(adapter, name):
    m = adapter.modules[name]
    return m.scale * (m.lora_B.double() @ m.lora_A.double())


def test_combined_adapter_equals_weighted_sum(two_adapters, tmp_path):
    a, b = read_adapter(two_adapters / "a"), read_adapter(two_adapters / "b")
    w = [0.7, -1.3]
    c = combine_adapters([a, b], w)
    assert set(c.modules) == set(a.modules) | set(b.modules)
    q0 = "model.layers.0.self_attn.q_proj"
    assert c.modules[q0].rank == 4 + 2 and c.modules[q0].scale == 1.0
    for name in c.modules:
        expect = sum(wi * _delta(ad, name) for wi, ad in zip(w, (a, b)) if name in ad.modules)
        torch.testing.assert_close(_delta(c, name), expect, rtol=1e-6, atol=1e-7)
    # As a model: combined adapter logits == a model holding W0 + Σ wᵢ·sᵢ·BᵢAᵢ (merged 16-bit weights)
    model = tiny_model("llama")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    from qlora.adapters.files import install_adapter

    install_adapter(model, c)
    x = batch()
    got = logits(model, x)
    merged = merge_and_unload(copy.deepcopy(model))
    for name in c.modules:
        expect_w = base_sd[name + ".weight"].double() + sum(
            wi * _delta(ad, name) for wi, ad in zip(w, (a, b)) if name in ad.modules
        )
        torch.testing.assert_close(merged.get_submodule(name).weight.double(), expect_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged, x), got, rtol=1e-4, atol=1e-4)
    # The combined file is a valid PEFT adapter (per-module ranks and alphas in rank/alpha_pattern)
    write_adapter(c, tmp_path / "c")
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "c")).eval()
    torch.testing.assert_close(logits(peft_model, x), got, rtol=1e-5, atol=1e-5)


def test_adapter_arithmetic_difference_cancels(two_adapters):
    model = tiny_model("llama")
    add_adapter(model, "a", two_adapters / "a")
    add_adapter(model, "b", two_adapters / "b")
    x = batch()
    add_weighted_adapter(model, ["a", "a"], [1.0, -1.0], "zero")
    torch.testing.assert_close(logits(model, x), logits(tiny_model("llama"), x), rtol=1e-5, atol=1e-5)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "sum")
    assert active_adapter(model) == "sum"
    sum_logits = logits(model, x)
    diff = combine_adapters([bank_adapter(model, "sum"), bank_adapter(model, "b")], [1.0, -1.0])
    add_adapter(model, "sum-b", diff, activate=True)
    set_active_adapter(model, "sum-b")
    torch.testing.assert_close(logits(model, x), logits(_single(two_adapters / "a"), x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sum_logits, logits(model, x))


def test_combine_errors(two_adapters):
    a = read_adapter(two_adapters / "a")
    with pytest.raises(InputError, match="2 weights"):
        combine_adapters([a], [1.0, 2.0])
    d = tiny_model("llama")
    apply_lora(d, "qv", rank=2, alpha=2.0, use_dora=True)
    from qlora.adapters.files import adapter_from_model

    with pytest.raises(InputError, match="DoRA"):
        combine_adapters([a, adapter_from_model(d)], [1.0, 1.0])


def test_multi_adapter_on_nf4_base(two_adapters):
    x = batch()
    model = tiny_model("llama")
    quantize_model(model, compute_dtype=torch.float32)
    add_adapter(model, "a", two_adapters / "a")
    add_adapter(model, "b", two_adapters / "b", activate=True)
    assert torch.equal(logits(model, x), logits(_single(two_adapters / "b", nf4=True), x))


def test_dora_and_plain_adapters_on_the_same_layer(two_adapters, tmp_path):
    """One adapter is DoRA, the other plain LoRA, both on q_proj: switching swaps the layer class around one base."""
    d = tiny_model("llama")
    apply_lora(d, ["q_proj", "o_proj"], rank=2, alpha=4.0, use_dora=True, dtype=torch.float32)
    randomize_adapters(d, seed=13)
    save_adapter(d, tmp_path / "d")
    x = batch()
    ref_a, ref_d = logits(_single(two_adapters / "a"), x), logits(_single(tmp_path / "d"), x)
    model = tiny_model("llama")
    add_adapter(model, "a", two_adapters / "a")
    add_adapter(model, "d", tmp_path / "d", trainable=True)
    q = "model.layers.0.self_attn.q_proj"
    base = model.get_submodule(q).base_layer
    assert type(model.get_submodule(q)) is LoRALinear and torch.equal(logits(model, x), ref_a)
    set_active_adapter(model, "d")
    assert type(model.get_submodule(q)) is DoRALinear and model.get_submodule(q).base_layer is base
    assert torch.equal(logits(model, x), ref_d)
    live = lora_parameters(model)  # DoRA's A, B and m; "a" stays frozen in the bank
    assert len(live) == 3 * 4 and all(p.requires_grad for p in live)
    set_active_adapter(model, "a")
    assert torch.equal(logits(model, x), ref_a) and not lora_parameters(model)
    set_active_adapter(model, "d")
    assert all(p is q for p, q in zip(lora_parameters(model), live))  # the optimizer's parameters are live again
    assert merge(model) == 4
    torch.testing.assert_close(logits(model, x), ref_d, rtol=1e-4, atol=1e-4)
    assert unmerge(model) == 4 and torch.equal(logits(model, x), ref_d)
    assert bank_adapter(model, "d").use_dora and not bank_adapter(model, "a").use_dora
