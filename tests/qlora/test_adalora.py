"""AdaLoRA: the layer, the rank allocator and the files, each against PEFT's AdaLoRA as the oracle."""

import copy
import json

import pytest
import torch
from lora_helpers import batch, logits, tiny_model
from peft import AdaLoraConfig, PeftModel, get_peft_model

from layers import AdaLoRALinear
from qlora.adapters.adalora import read_adalora
from qlora.adapters.files import load_adapter, save_adapter
from qlora.lora.adalora import AdaLoRASchedule, RankAllocator
from qlora.lora.surgery import apply_lora, lora_modules, lora_parameters
from quant import InputError

TARGETS = ["q_proj", "v_proj", "up_proj"]
SCHEDULE = dict(init_r=6, target_r=3, total_step=8, tinit=1, tfinal=2, deltaT=1)


def _peft(model):
    cfg = AdaLoraConfig(lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **SCHEDULE)
    return get_peft_model(model, cfg)


def _copy_peft_into_ours(peft_model, ours):
    """Our AdaLoRA layers holding PEFT's values (test code may read PEFT's names; the library never does)."""
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_E")
              and "default" in getattr(m, "lora_E", {})}
    for name, layer in lora_modules(ours):
        pm = theirs[name]
        layer.load_svd(pm.lora_A["default"], pm.lora_B["default"], pm.lora_E["default"], 8.0, 6, trainable=True,
                       dtype=torch.float32)


def _sgd_step(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad


def test_layer_and_allocator_follow_peft_step_by_step():
    """The same values, inputs and SGD steps: losses (with the orthogonality term), masks and logits agree."""
    x = batch()
    peft_model = _peft(tiny_model())
    ours = tiny_model()
    apply_lora(ours, TARGETS, rank=6, alpha=8.0, dtype=torch.float32, adalora=True)
    _copy_peft_into_ours(peft_model, ours)
    alloc = RankAllocator(ours, AdaLoRASchedule(**SCHEDULE))
    theirs_params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.train(), ours.train()
    for step in range(SCHEDULE["total_step"]):
        loss_t = peft_model(input_ids=x, labels=x).loss  # PEFT adds orth_reg_weight x the penalty itself
        loss_t.backward()
        loss_o = ours(input_ids=x, labels=x).loss
        loss_o.backward()
        loss_o = loss_o.detach() + alloc.orth_backward()
        assert float(loss_o) == pytest.approx(float(loss_t), rel=1e-5, abs=1e-6), step
        _sgd_step(theirs_params)
        _sgd_step(lora_parameters(ours))
        peft_model.base_model.update_and_allocate(step)
        alloc.step(step)
        peft_model.zero_grad(), ours.zero_grad()
    pattern = {k.replace(".default", ""): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert any(not all(v) for v in pattern.values())  # something was pruned, so the comparison can fail
    for name, keep in alloc.rank_pattern.items():
        assert keep.tolist() == pattern[f"{name}.lora_E"], name
    assert sum(int(k.sum()) for k in alloc.rank_pattern.values()) <= 3 * len(alloc.layers)
    torch.testing.assert_close(logits(ours.eval(), x), logits(peft_model.eval(), x), rtol=1e-4, atol=1e-5)


def test_peft_adalora_file_loads_in_qlora(tmp_path):
    x = batch()
    peft_model = _peft(tiny_model())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.train()
    for step in range(SCHEDULE["total_step"]):
        peft_model(input_ids=x, labels=x).loss.backward()
        _sgd_step(params, lr=0.2)
        peft_model.base_model.update_and_allocate(step)
        peft_model.zero_grad()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # larger singular values where PEFT kept them, so the comparison can fail
        for n, p in peft_model.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.where(p != 0, torch.randn(p.shape, generator=g), torch.zeros_like(p)))
    want = logits(peft_model.eval(), x)
    assert (want - logits(tiny_model(), x)).abs().max() > 1e-3
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = tiny_model()
    load_adapter(ours, tmp_path / "peft")  # served as the equal LoRA
    torch.testing.assert_close(logits(ours.eval(), x), want, rtol=1e-5, atol=1e-5)


def test_qlora_adalora_file_loads_in_peft_and_resumes_unpruned(tmp_path):
    x = batch()
    base = tiny_model()
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=6, alpha=8.0, dtype=torch.float32, adalora=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, m in lora_modules(ours):
            m.lora_E.copy_(torch.randn(m.lora_E.shape, generator=g))
            m.mask(torch.tensor([True, False, True, True, False, True]))
    want = logits(ours.eval(), x)
    schedule = AdaLoRASchedule(**SCHEDULE)
    save_adapter(ours, tmp_path / "ad", adalora=schedule.peft_fields())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 3
    assert all(v == [True, False, True, True, False, True] for v in cfg["rank_pattern"].values())
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(theirs, x), want, rtol=1e-5, atol=1e-5)

    read = read_adalora(tmp_path / "ad")  # the unpruned tensors come back for a resume
    again = copy.deepcopy(base)
    apply_lora(again, TARGETS, rank=6, alpha=8.0, dtype=torch.float32, adalora=True)
    from qlora.adapters.adalora import install_adalora

    install_adalora(again, read, trainable=True)
    for (_, a), (_, b) in zip(lora_modules(again), lora_modules(ours)):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight) and torch.equal(a.lora_E, b.lora_E)
    torch.testing.assert_close(logits(again.eval(), x), want, rtol=0, atol=0)


def test_adalora_refusals():
    with pytest.raises(InputError, match="AdaLoRA and DoRA"):
        apply_lora(tiny_model(), TARGETS, rank=6, use_dora=True, adalora=True)
    with pytest.raises(InputError, match="AdaLoRA and rsLoRA"):
        apply_lora(tiny_model(), TARGETS, rank=6, use_rslora=True, adalora=True)
    with pytest.raises(InputError, match="target rank"):
        AdaLoRASchedule(init_r=4, target_r=8, total_step=10)
    with pytest.raises(InputError, match="tinit"):
        AdaLoRASchedule(init_r=8, target_r=4, total_step=10, tinit=6, tfinal=4)
    layer = AdaLoRALinear(torch.nn.Linear(8, 8), 4, 8.0)
    with pytest.raises(InputError, match="shape"):
        layer.mask(torch.ones(3, dtype=torch.bool))


def test_an_adalora_recipe_prunes_saves_for_peft_and_resumes_bit_for_bit(tmp_path):
    import shutil

    from safetensors.torch import load_file
    from test_train import FAST, TINY, _losses
    from transformers import AutoModelForCausalLM

    from qlora.builtin_models import resolve_model_dir
    from qlora.train.loop import train
    from qlora.train.recipe import load_recipe

    def run(out):
        recipe = load_recipe(TINY, FAST + [f"output_dir={out}", "lora.variant=adalora", "lora.rank=6",
                                           "lora.adalora_target_r=3", "lora.adalora_tinit=0", "lora.adalora_tfinal=1",
                                           "optimizer.lr=2e-2"])
        return train(recipe, say=lambda m: None, progress=False)

    ref = tmp_path / "ref"
    assert run(ref).steps == 4
    cfg = json.loads((ref / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["total_step"] == 4
    kept = [sum(v) for v in cfg["rank_pattern"].values()]
    assert sum(kept) <= 3 * len(kept) < 6 * len(kept) and len(set(kept)) > 1  # pruned, unevenly
    base_dir = resolve_model_dir("builtin:tiny-llama")
    ids = torch.tensor([[1, 5, 9, 33, 80, 7]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ref)).eval()
    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(ours, ref)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)

    again = tmp_path / "again"
    run(again)
    for name in ("adapter_model.safetensors", "adapter_config.json", "adalora_full.safetensors", "checkpoint-0000004"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(again)
    for f in ("adapter_model.safetensors", "adalora_full.safetensors"):
        a, b = load_file(ref / f), load_file(again / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert _losses(ref)[0] == _losses(again)[0]


def test_adalora_recipe_refusals():
    from qlora.train.recipe import recipe_from_dict

    with pytest.raises(InputError, match="'lora.variant' 'adalora' and 'lora.rank_pattern'"):
        recipe_from_dict({"lora": {"variant": "adalora", "rank_pattern": {"q_proj": 4}}})
    with pytest.raises(InputError, match="'lora.variant' 'adalora' and 'lora.use_rslora'"):
        recipe_from_dict({"lora": {"variant": "adalora", "use_rslora": True}})
    with pytest.raises(InputError, match="adalora_target_r' is 32, above 'lora.rank' 16"):
        recipe_from_dict({"lora": {"variant": "adalora", "adalora_target_r": 32}})
