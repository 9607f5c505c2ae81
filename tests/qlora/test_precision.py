"""``auto`` dtypes: bfloat16 where the device multiplies it natively, float32 where bf16 would crawl."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora.train.loop import train
from qlora.train.plan import settings_from_recipe
from qlora.train.precision import auto_dtype, autocast_dtype_for, native_bf16, resolve_dtypes
from qlora.train.recipe import load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml"
ONE_STEP = ["seq_len=32", "micro_batch_size=2", "effective_batch_size=2", "max_steps=1", "eval_steps=100",
            "save_steps=1", "diagnostics_steps=100", "lora.rank=2", "data.eval_fraction=0.02", "task.examples=0"]


@pytest.fixture
def slow_bf16_cpu(monkeypatch):
    """This CPU as one without native bf16: with oneDNN off torch takes its element-wise bf16 fallback."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)


def test_auto_is_float32_on_a_cpu_without_native_bf16(slow_bf16_cpu):
    assert not native_bf16("cpu") and auto_dtype("cpu") == "float32"
    assert autocast_dtype_for(torch.device("cpu"), "auto") == torch.float32


def test_auto_is_bfloat16_where_bf16_is_native(native_bf16_cpu):
    assert native_bf16("cpu") and auto_dtype("cpu") == "bfloat16"
    assert autocast_dtype_for(torch.device("cpu"), "auto") == torch.bfloat16


def test_a_cuda_run_is_planned_in_bfloat16_from_any_machine(slow_bf16_cpu):
    recipe = load_recipe(TINY)
    assert auto_dtype("cuda") == "bfloat16"
    assert settings_from_recipe(recipe, "cuda").adapter_dtype == "bfloat16"
    assert settings_from_recipe(recipe, "cpu").adapter_dtype == "float32"


def test_resolution_keeps_explicit_values_and_warns_about_slow_bf16(slow_bf16_cpu, caplog):
    recipe = load_recipe(TINY, ["model.dtype=bfloat16", "lora.dtype=float32"])
    said = []
    with caplog.at_level(logging.WARNING, logger="qlora.train.precision"):
        got = resolve_dtypes(recipe, "cpu", said.append)
    assert (got.model.dtype, got.quant.compute_dtype, got.lora.dtype) == ("bfloat16", "float32", "float32")
    assert said == ["dtypes: quant.compute_dtype auto -> float32: this CPU has no native bf16 matmul (no avx512_bf16 "
                    "or AMX, or oneDNN off), where bf16 matmuls run far slower than float32 "
                    "(bench/matmul_dtypes.py)"]
    assert "asks for bfloat16 (model.dtype)" in caplog.text
    assert resolve_dtypes(got, "cpu", said.append) == got and len(said) == 1  # nothing left to resolve


def test_a_run_on_a_cpu_without_native_bf16_trains_and_saves_in_float32(slow_bf16_cpu, tmp_path):
    out = tmp_path / "out"
    said = []
    res = train(load_recipe(TINY, ONE_STEP + [f"output_dir={out}"]), say=said.append, progress=False)
    assert res.stopped == "done"
    assert any(m.startswith("dtypes: model.dtype, quant.compute_dtype, lora.dtype auto -> float32") for m in said)
    assert any("float32 compute" in m and "planner models bf16" in m for m in said)  # the plan says what it models
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    saved = yaml.safe_load((out / "checkpoint-0000001" / "recipe.yaml").read_text())  # the resolved recipe is kept
    assert (saved["model"]["dtype"], saved["quant"]["compute_dtype"], saved["lora"]["dtype"]) == ("float32",) * 3
