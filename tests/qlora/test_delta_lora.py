"""Delta-LoRA: the implicit layer against an explicit reference that writes into W after every step."""

import copy
import json

import pytest
import torch
from lora_helpers import batch, logits, tiny_model
from peft import PeftModel

from layers import DeltaLoRALinear, LoRALinear
from qlora.adapters.files import save_adapter
from qlora.lora.surgery import apply_lora, lora_modules, lora_parameters
from quant import InputError, quantize_model

LAMBDA = 0.5


def _step(model, opt, x):
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_implicit_base_updates_equal_writing_into_w_after_every_step():
    """The paper's algorithm, run literally on a float32 base: W += λ·s·(B'A' − BA) after each step."""
    x = batch()
    ours = tiny_model()
    torch.manual_seed(0)
    apply_lora(ours, "all-linear", rank=4, alpha=8.0, dtype=torch.float32, delta_ratio=LAMBDA)
    ref = tiny_model()
    torch.manual_seed(0)
    apply_lora(ref, "all-linear", rank=4, alpha=8.0, dtype=torch.float32)  # the same A draws
    # SGD: Adam divides by sqrt(v), which turns float noise in near-zero gradients (A's, while B is near zero)
    # into lr-sized steps, so two exact implementations drift apart; SGD keeps them within rounding
    opt_ours = torch.optim.SGD(lora_parameters(ours), lr=0.5)
    opt_ref = torch.optim.SGD(lora_parameters(ref), lr=0.5)
    ours.train(), ref.train()
    for _ in range(4):
        before = {n: (m.delta_weight()) for n, m in lora_modules(ref)}  # s·B·A before the step
        _step(ours, opt_ours, x)
        _step(ref, opt_ref, x)
        with torch.no_grad():
            for n, m in lora_modules(ref):
                m.base_layer.weight += LAMBDA * (m.delta_weight() - before[n])
    torch.testing.assert_close(logits(ours.eval(), x), logits(ref.eval(), x), rtol=1e-5, atol=1e-5)
    for (_, a), (_, b) in zip(lora_modules(ours), lora_modules(ref)):
        torch.testing.assert_close(a.lora_B.weight, b.lora_B.weight, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "base_layer" in n)


def test_saved_adapter_is_plain_lora_for_the_original_base_and_merges_the_same(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0, dtype=torch.float32, delta_ratio=LAMBDA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    x = batch()
    want = logits(model.eval(), x)
    assert (want - logits(base, x)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == 8.0 * (1 + LAMBDA)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(peft_model, x), want, rtol=1e-5, atol=1e-5)
    layer = next(m for _, m in lora_modules(model))
    w = layer.merged_weight(torch.float32)
    torch.testing.assert_close(w - layer.base_layer.weight, layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_delta_lora_on_an_nf4_base_keeps_the_4bit_base_frozen():
    model = tiny_model(dtype=torch.bfloat16)
    quantize_model(model)
    before = logits(model, batch())
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    apply_lora(model, "all-linear", rank=4, delta_ratio=1.0)
    torch.testing.assert_close(logits(model, batch()), before, rtol=0, atol=0)  # B starts at zero
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    _step(model, opt, batch())
    assert all(torch.equal(b, codes[n.replace(".base_layer", "")]) for n, b in model.named_buffers()
               if b.dtype == torch.uint8)
    assert all(isinstance(m, DeltaLoRALinear) and isinstance(m, LoRALinear) for _, m in lora_modules(model))


def test_delta_lora_refusals():
    with pytest.raises(InputError, match="no dropout"):
        apply_lora(tiny_model(), "qv", rank=4, dropout=0.1, delta_ratio=1.0)
    with pytest.raises(InputError, match="no DoRA"):
        apply_lora(tiny_model(), "qv", rank=4, use_dora=True, delta_ratio=1.0)
    with pytest.raises(InputError, match=">= 0"):
        DeltaLoRALinear(torch.nn.Linear(8, 8), 2, 4.0, delta_ratio=-1.0)
    from qlora.train.recipe import recipe_from_dict

    with pytest.raises(InputError, match="'lora.variant' 'delta' and 'lora.dropout'"):
        recipe_from_dict({"lora": {"variant": "delta", "dropout": 0.05}})
    with pytest.raises(InputError, match="'lora.variant' 'delta' and 'lora.init' 'loftq'"):
        recipe_from_dict({"lora": {"variant": "delta", "init": "loftq"}})


def test_a_delta_recipe_trains_and_resumes_bit_for_bit(tmp_path):
    import shutil

    from safetensors.torch import load_file
    from test_train import FAST, TINY, _losses

    from qlora.train.loop import train
    from qlora.train.recipe import load_recipe

    def run(out):
        recipe = load_recipe(TINY, FAST + [f"output_dir={out}", "lora.variant=delta", "lora.delta_ratio=0.5",
                                           "lora.dropout=0.0"])
        return train(recipe, say=lambda m: None, progress=False)

    ref = tmp_path / "ref"
    run(ref)
    evals = [r["eval_loss"] for r in _losses(ref)[1] if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05
    again = tmp_path / "again"
    run(again)
    for name in ("adapter_model.safetensors", "adapter_config.json", "checkpoint-0000004"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(again)
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref)[0] == _losses(again)[0]
