"""PiSSA, OLoRA, LoftQ and nonzero in the trainer: factors from the weights, adapters PEFT loads on the original base.

The saved adapter is rank 2r, ``[A; A0]`` and ``[B, -B0]`` (PEFT's own conversion), so on the original base
``W`` it gives ``W - s·B0·A0 + s·B·A``: the trained model with the base's residual unquantized. Two oracles:
on a 16-bit base (nothing is rounded) PEFT reproduces the trained model to float32 rounding; on an NF4 base
PEFT reproduces it exactly once its base holds what ours held (the dequantized 4-bit base plus ``s·B0·A0``),
so all that separates them on the original ``W`` is the 4-bit error of the residual, which
``bench/init_error.py`` measures (docs/lora.md).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from layers import base_weight
from qlora.adapters.files import save_adapter
from qlora.builtin_models import resolve_model_dir
from qlora.lora.inits import init_from_weights
from qlora.lora.surgery import apply_lora, lora_modules
from qlora.train.build import build_model
from qlora.train.loop import train
from qlora.train.recipe import load_recipe
from quant import InputError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
RUN = ["seq_len=64", "micro_batch_size=2", "effective_batch_size=4", "max_steps=4", "eval_steps=2", "save_steps=2",
       "lora.rank=4", "lora.dropout=0.0", "data.eval_fraction=0.02", "optimizer.name=adamw", "optimizer.lr=1e-2",
       "model.dtype=float32", "quant.compute_dtype=float32", "lora.dtype=float32", "device=cpu"]


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True), ("nonzero", False)])
def test_adapter_for_the_original_base_reproduces_the_trained_model_in_peft(tmp_path, init, rslora):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    ours = copy.deepcopy(dense)
    apply_lora(ours, "all-linear", 4, 8.0, use_rslora=rslora, dtype=torch.float32)
    x = torch.randint(0, 256, (2, 16))
    initial = init_from_weights(ours, init)
    torch.testing.assert_close(_logits(ours, x), _logits(dense, x), rtol=0, atol=1e-5)  # starts at W
    with torch.no_grad():  # "training": move every factor
        for _, layer in lora_modules(ours):
            layer.lora_A.weight.add_(0.05 * torch.randn_like(layer.lora_A.weight))
            layer.lora_B.weight.add_(0.05 * torch.randn_like(layer.lora_B.weight))
    save_adapter(ours, tmp_path, initial=initial)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(8.0 * (2**0.5 if rslora else 2))
    got = _logits(PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path), x)
    want = _logits(ours, x)
    assert float((want - _logits(dense, x)).abs().max()) > 0.1  # the update is not small
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    res = train(load_recipe(TINY, RUN + [f"output_dir={out}", *extra]), say=lambda m: None, progress=False)
    assert res.stopped in ("done", "signal")
    return out


def _trained(out, *extra):
    """The trained model as the trainer held it: rebuilt from the run's last checkpoint."""
    r = load_recipe(TINY, RUN + [f"output_dir={out}", *extra])
    model, _, initial = build_model(resolve_model_dir(r.model.path), torch.device("cpu"), r.quant, r.lora, "float32",
                                    False, resume_adapter=out / "checkpoint-0000004" / "adapter", seed=r.seed)
    return model, initial


def test_pissa_on_a_16_bit_base_trains_to_an_adapter_peft_applies_exactly(tmp_path):
    extra = ("lora.init=pissa", "quant.quant_type=none")
    out = _run(tmp_path, "pissa16", *extra)
    model, _ = _trained(out, *extra)
    dense = AutoModelForCausalLM.from_pretrained(resolve_model_dir("builtin:tiny-llama"), dtype=torch.float32)
    x = torch.randint(3, 1000, (2, 32))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(dense, out), x), _logits(model, x),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "loftq", "nonzero"])
def test_nf4_init_resumes_exactly_and_its_adapter_is_the_trained_model_in_peft(tmp_path, init):
    import signal

    extra = (f"lora.init={init}", "lora.loftq_iters=2")
    whole = _run(tmp_path, "whole", *extra)
    out = tmp_path / "cut"
    res = train(load_recipe(TINY, RUN + [f"output_dir={out}", *extra]), say=lambda m: None, progress=False,
                signal_at=(2, signal.SIGTERM))
    assert res.stopped == "signal"
    _run(tmp_path, "cut", *extra)  # resumes from step 2: the checkpoint's rank-2r adapter, split again
    a, b = load_file(out / "adapter_model.safetensors"), load_file(whole / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert next(iter(a.values())).shape[0] in (8, 64, 128)  # rank 2r (A: 8 rows; B: out x 8)
    assert all(v.shape[0] == 8 for k, v in a.items() if "lora_A" in k)
    # PEFT on a base holding what ours held (dequantized 4-bit base + s·B0·A0): the same model
    model, initial = _trained(whole, *extra)
    dense = AutoModelForCausalLM.from_pretrained(resolve_model_dir("builtin:tiny-llama"), dtype=torch.float32)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            a0, b0 = initial.factors[name]
            w = base_weight(layer.base_layer, torch.float32) + layer.scale * (b0 @ a0)
            dense.get_submodule(name).weight.copy_(w)
    x = torch.randint(3, 1000, (2, 32))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(dense, whole), x), _logits(model, x),
                               rtol=0, atol=1e-4)


def test_inits_that_do_not_go_together_are_refused_naming_both():
    with pytest.raises(InputError, match="'lora.init' 'pissa' and 'lora.variant' 'dora'"):
        load_recipe(TINY, ["lora.init=pissa", "lora.variant=dora"])
    with pytest.raises(InputError, match="'lora.init' 'loftq' and 'quant.quant_type' 'none'"):
        load_recipe(TINY, ["lora.init=loftq", "quant.quant_type=none"])
    with pytest.raises(InputError, match="lora.init.*'kaiming', 'gaussian', 'pissa', 'olora', 'loftq' or 'nonzero'"):
        load_recipe(TINY, ["lora.init=svd"])


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "nonzero"])
@pytest.mark.parametrize("shape", [(512, 256), (256, 768)])
def test_init_transient_matches_the_planner(init, shape):
    """memory.terms.INIT_TRANSIENT against the live tensors of one layer's init (bench/init_error.py measures)."""
    from init_error import init_transient

    from memory.terms import init_transient_bytes

    out, inp = shape
    assert init_transient_bytes(init, out * inp) == pytest.approx(init_transient(init, out, inp), rel=0.05)


def test_the_planner_adds_an_init_phase():
    import memory

    plain = memory.estimate("llama-3.1-8b", memory.Settings())
    loft = memory.estimate("llama-3.1-8b", memory.Settings(init="loftq"))
    # Llama-3.1-8B at seq 2048: LoftQ's decomposition of a 14336 x 4096 MLP weight outgrows the step's peak
    assert "init" not in plain.phases and loft.peak_phase == "init" and loft.breakdown["init_transient"] > 0
    assert loft.phases["init"] > plain.phases["optimizer"]
    assert {k: v for k, v in loft.phases.items() if k != "init"} == plain.phases
