"""VeRA: the layer, the shared matrices, and PEFT's VeRA files both ways with peft as the oracle."""

import copy
import json

import pytest
import torch
from lora_helpers import batch, logits, tiny_model
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from layers.vera import VeRALinear, VeRAProjections
from qlora.adapters.files import load_adapter, read_adapter, save_adapter
from qlora.adapters.merging import merge_and_unload
from qlora.adapters.multi import add_adapter, set_active_adapter
from qlora.adapters.vera import install_vera, read_vera
from qlora.lora.param_groups import lora_param_groups
from qlora.lora.surgery import lora_modules, lora_parameters
from qlora.lora.vera import apply_vera, vera_projections
from quant import InputError, quantize_model

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # in/out widths 64 and 128 both ways: slicing matters


@torch.no_grad()
def _randomize_vera(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        m.vera_lambda_b.copy_(torch.randn(m.vera_lambda_b.shape, generator=g) * 0.5)
        m.vera_lambda_d.mul_(1 + torch.randn(m.vera_lambda_d.shape, generator=g))


def test_shared_matrices_are_peft_s_bit_for_bit():
    peft_model = get_peft_model(tiny_model(), VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=7))
    a, b = peft_model.base_model.vera_A["default"], peft_model.base_model.vera_B["default"]
    ours = VeRAProjections.seeded(8, a.shape[1], b.shape[0], 7)
    assert torch.equal(ours.vera_A, a) and torch.equal(ours.vera_B, b)
    assert not torch.equal(VeRAProjections.seeded(8, a.shape[1], b.shape[0], 8).vera_A, a)


def test_layer_starts_at_its_base_and_trains_only_the_vectors():
    base = tiny_model()
    model = copy.deepcopy(base)
    report = apply_vera(model, TARGETS, rank=8, dtype=torch.float32)
    x = batch()
    torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)  # b starts at zero
    n_layers = len(report.modules)
    assert n_layers == 2 * len(TARGETS)
    # r + out trainable numbers per layer; the shared matrices are buffers, never parameters
    assert report.trainable == sum(8 + m.out_features for _, m in lora_modules(model))
    params = lora_parameters(model)
    proj = vera_projections(model)
    assert all(p is not proj.vera_A and p is not proj.vera_B for p in params)
    assert "vera_projections.vera_A" not in model.state_dict()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("vera_lambda_b"))
    groups = lora_param_groups(model, 1e-3)
    assert {g["name"] for g in groups} == {"vera_lambda_b", "vera_lambda_d"}


def test_qlora_vera_file_loads_in_peft_with_equal_logits(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    apply_vera(model, TARGETS, rank=8, projection_prng_key=11, dtype=torch.float32, dropout=0.1)
    _randomize_vera(model)
    model.eval()
    x = batch()
    ours = logits(model, x)
    assert (ours - logits(base, x)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == 8 and cfg["projection_prng_key"] == 11
    assert cfg["vera_dropout"] == 0.1 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(peft_model, x), ours, rtol=1e-5, atol=1e-5)


def test_peft_vera_file_loads_in_qlora_both_as_lora_and_as_vera(tmp_path):
    base = tiny_model()
    peft_model = get_peft_model(copy.deepcopy(base), VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=5,
                                                                 d_initial=0.2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # test code may look at PEFT's names; the library never does
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.eval()
    x = batch()
    theirs = logits(peft_model, x)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    served = copy.deepcopy(base)  # served as the equal LoRA: the path generate, eval and merge take
    load_adapter(served, tmp_path / "peft")
    torch.testing.assert_close(logits(served.eval(), x), theirs, rtol=1e-5, atol=1e-5)

    merged = merge_and_unload(served)  # and merged into the weights
    torch.testing.assert_close(logits(merged.eval(), x), theirs, rtol=1e-4, atol=1e-4)

    vera = read_vera(tmp_path / "peft")  # as VeRA layers: the resume path
    assert vera.rank == 8 and vera.projection_prng_key == 5 and vera.d_initial == 0.2
    again = copy.deepcopy(base)
    apply_vera(again, TARGETS, rank=8, projection_prng_key=5, dtype=torch.float32)
    install_vera(again, vera, trainable=True)
    torch.testing.assert_close(logits(again.eval(), x), theirs, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in lora_parameters(again))


def test_vera_in_a_multi_adapter_bank_next_to_lora(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    apply_vera(model, TARGETS, rank=8, dtype=torch.float32)
    _randomize_vera(model)
    x = batch()
    want = logits(model.eval(), x)
    save_adapter(model, tmp_path / "vera")
    bank = copy.deepcopy(base)
    add_adapter(bank, "v", tmp_path / "vera")
    torch.testing.assert_close(logits(bank.eval(), x), want, rtol=1e-5, atol=1e-5)
    set_active_adapter(bank, "v")


def test_vera_on_an_nf4_base():
    model = tiny_model(dtype=torch.bfloat16)
    quantize_model(model)
    before = logits(model, batch())
    apply_vera(model, "all-linear", rank=16)
    assert all(isinstance(m, VeRALinear) for _, m in lora_modules(model))
    torch.testing.assert_close(logits(model, batch()), before, rtol=0, atol=0)
    _randomize_vera(model)
    model.train()
    model(input_ids=batch(), labels=batch()).loss.backward()
    assert all(p.grad is not None for p in lora_parameters(model))


def test_bad_vera_files_and_calls(tmp_path):
    model = tiny_model()
    apply_vera(model, TARGETS, rank=8, dtype=torch.float32)
    save_adapter(model, tmp_path / "ad")
    cfg_path, w_path = tmp_path / "ad" / "adapter_config.json", tmp_path / "ad" / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(str(w_path))

    cfg_path.write_text(json.dumps(dict(cfg, save_projection=False)))
    with pytest.raises(InputError, match="save_projection"):
        read_adapter(tmp_path / "ad")
    cfg_path.write_text(json.dumps(dict(cfg, r=4)))
    with pytest.raises(InputError, match="rank 8 but adapter_config.json says r=4"):
        read_adapter(tmp_path / "ad")
    cfg_path.write_text(json.dumps(cfg))
    key = next(k for k in tensors if k.endswith("vera_lambda_d"))
    save_file({k: v for k, v in tensors.items() if k != key}, str(w_path))
    with pytest.raises(InputError, match="lacks its vera_lambda_d"):
        read_adapter(tmp_path / "ad")
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, str(w_path))
    with pytest.raises(InputError, match="base_model.vera_B"):
        read_adapter(tmp_path / "ad")

    layer = next(m for _, m in lora_modules(model))
    with pytest.raises(InputError, match="LoRA-FA"):
        layer.freeze_A()
    with pytest.raises(InputError, match="load_vectors"):
        layer.install(torch.zeros(8, 64), torch.zeros(64, 8), 8.0)
    with pytest.raises(InputError, match="too small"):
        VeRALinear(torch.nn.Linear(256, 8), vera_projections(model))
    with pytest.raises(InputError, match="applied once"):
        apply_vera(model, TARGETS, rank=8)
    with pytest.raises(InputError, match="positive integer"):
        apply_vera(tiny_model(), TARGETS, rank=0)
    other = tiny_model()
    apply_vera(other, TARGETS, rank=8, projection_prng_key=1, dtype=torch.float32)
    save_file(tensors, str(w_path))
    with pytest.raises(InputError, match="projection_prng_key"):
        install_vera(other, read_vera(tmp_path / "ad"))


def test_diagnostics_read_the_vera_update():
    from qlora.lora.diagnostics import lora_diagnostics

    model = tiny_model()
    apply_vera(model, TARGETS, rank=8, dtype=torch.float32)
    _randomize_vera(model)
    model(input_ids=batch(), labels=batch()).loss.backward()
    for d, (_, m) in zip(lora_diagnostics(model), lora_modules(model)):
        assert d.update_norm == pytest.approx(float(torch.linalg.vector_norm(m.delta_weight())), rel=1e-4)
        assert d.grad_A_norm > 0 and d.grad_B_norm > 0


def test_a_vera_recipe_trains_saves_for_peft_and_resumes_bit_for_bit(tmp_path):
    """lora.variant vera through the trainer: the loss falls, PEFT loads the file, and a resume replays the run."""
    import shutil

    from test_train import FAST, TINY, _losses
    from transformers import AutoModelForCausalLM

    from qlora.builtin_models import resolve_model_dir
    from qlora.train.loop import train
    from qlora.train.recipe import load_recipe

    def run(out):
        recipe = load_recipe(TINY, FAST + [f"output_dir={out}", "lora.variant=vera", "lora.rank=32",
                                           "optimizer.lr=5e-2", "lora.projection_prng_key=3"])
        return train(recipe, say=lambda m: None, progress=False)

    ref = tmp_path / "ref"
    assert run(ref).steps == 4
    evals = [r["eval_loss"] for r in _losses(ref)[1] if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05
    cfg = json.loads((ref / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == 32 and cfg["projection_prng_key"] == 3

    base_dir = resolve_model_dir("builtin:tiny-llama")
    ids = torch.tensor([[1, 5, 9, 33, 80, 7]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(ref))
    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(ours, ref)
    with torch.no_grad():
        theirs = peft_model(ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs, rtol=1e-5, atol=1e-5)
        assert (theirs - plain).abs().max() > 1e-4

    again = tmp_path / "again"  # the same run, cut back to its step-2 checkpoint, then re-run: it resumes there
    run(again)
    for name in ("adapter_model.safetensors", "adapter_config.json", "checkpoint-0000004"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(again)
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref)[0] == _losses(again)[0]


def test_vera_recipe_refuses_the_lora_only_keys():
    from qlora.train.recipe import recipe_from_dict

    for key, value in (("rank_pattern", {"q_proj": 4}), ("init", "pissa"), ("use_rslora", True),
                       ("freeze_A", True), ("loraplus_ratio", 16.0)):
        with pytest.raises(InputError, match=f"'lora.variant' 'vera' and 'lora.{key}'"):
            recipe_from_dict({"lora": {"variant": "vera", key: value}})


def test_read_vera_refuses_a_lora_folder(tmp_path):
    from qlora.lora.surgery import apply_lora

    model = tiny_model()
    apply_lora(model, "qv", rank=4)
    save_adapter(model, tmp_path / "lora")
    with pytest.raises(InputError, match="peft_type 'LORA', not 'VERA'"):
        read_vera(tmp_path / "lora")
