"""The optimizer a *recipe* builds (through the trainer's own setup), not only the group helper."""

from pathlib import Path

import pytest
import torch

from qlora.train.build import build_model
from qlora.train.optim import build_optimizer
from qlora.train.plan import plan_run
from qlora.train.recipe import load_recipe
from qlora.train.setup import param_groups, resolve_device

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml"
FAST = ["seq_len=64", "micro_batch_size=2", "effective_batch_size=4", "lora.rank=4"]


def _optimizer(tmp_path, *overrides):
    recipe = load_recipe(TINY, FAST + [f"output_dir={tmp_path / 'out'}", *overrides])
    device = resolve_device("cpu")
    model, _, _ = build_model(plan_run(recipe, device).model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype,
                           recipe.gradient_checkpointing)
    o = recipe.optimizer
    opt = build_optimizer(param_groups(model, o, recipe.lora.loraplus_ratio), o.name, o.lr, o.weight_decay,
                          tuple(o.betas), o.eps)
    return model, opt


def _decay_by_kind(model, opt) -> dict[str, set[float]]:
    from qlora.lora.surgery import named_lora_parameters

    kind = {id(p): k for _, k, p in named_lora_parameters(model)}
    out: dict[str, set[float]] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            out.setdefault(kind[id(p)], set()).add(g["weight_decay"])
    return out


@pytest.mark.parametrize("extra", [["lora.loraplus_ratio=16"], []], ids=["loraplus", "plain"])
def test_recipe_weight_decay_reaches_A_and_B(tmp_path, extra):
    model, opt = _optimizer(tmp_path, "optimizer.weight_decay=0.1", *extra)
    decay = _decay_by_kind(model, opt)
    assert decay["lora_A"] == {0.1} and decay["lora_B"] == {0.1}
    lrs = {g.get("name"): g["lr"] for g in opt.param_groups}
    if extra:
        assert lrs["lora_B"] == pytest.approx(16 * lrs["lora_A"])


@pytest.mark.parametrize("extra", [["lora.loraplus_ratio=16"], []], ids=["loraplus", "plain"])
def test_dora_magnitudes_never_get_weight_decay(tmp_path, extra):
    model, opt = _optimizer(tmp_path, "optimizer.weight_decay=0.1", "lora.variant=dora", *extra)
    decay = _decay_by_kind(model, opt)
    assert decay["lora_magnitude_vector"] == {0.0} and decay["lora_A"] == {0.1}
    # and the optimizer really leaves them undecayed: with zero gradients only decay could move them
    mags = [p for g in opt.param_groups for p in g["params"] if p.ndim == 1]
    before = [m.detach().clone() for m in mags]
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, mags))


def test_resumed_lora_fa_keeps_A_frozen_and_the_trained_values(tmp_path):
    """LoRA-FA after a resume: the installed A stays frozen (only B trains), with the saved values."""
    from qlora.lora.surgery import named_lora_parameters

    recipe = load_recipe(TINY, FAST + [f"output_dir={tmp_path / 'out'}", "lora.freeze_A=true"])
    device = resolve_device("cpu")
    model_dir = plan_run(recipe, device).model_dir
    model, save, _ = build_model(model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype)
    with torch.no_grad():
        for _, kind, p in named_lora_parameters(model, trainable_only=False):
            p.add_(0.01 if kind == "lora_B" else 0.0)
    save(tmp_path / "adapter")
    again, _, _ = build_model(model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype,
                           resume_adapter=tmp_path / "adapter")
    before = {(n, k): p for n, k, p in named_lora_parameters(model, trainable_only=False)}
    after = named_lora_parameters(again, trainable_only=False)
    assert after and {k for _, k, p in after if p.requires_grad} == {"lora_B"}
    assert all(torch.equal(p, before[(n, k)]) for n, k, p in after)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_recipe_attention_reaches_the_model(tmp_path, attn):
    """model.attn_implementation is what the planner plans, so it must be what the model runs."""
    recipe = load_recipe(TINY, FAST + [f"output_dir={tmp_path / 'out'}", f"model.attn_implementation={attn}"])
    device = resolve_device("cpu")
    model, _, _ = build_model(plan_run(recipe, device).model_dir, device, recipe.quant, recipe.lora,
                           recipe.model.dtype, attn_implementation=recipe.model.attn_implementation)
    assert model.config._attn_implementation == attn


def test_unavailable_attention_is_a_clear_error(tmp_path):
    from quant.errors import InputError

    recipe = load_recipe(TINY, FAST + [f"output_dir={tmp_path / 'out'}"])
    device = resolve_device("cpu")
    with pytest.raises(InputError, match="flash_attention_2"):
        build_model(plan_run(recipe, device).model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype,
                    attn_implementation="flash_attention_2")
