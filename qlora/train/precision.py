"""Which floating-point dtypes a run computes in, and why.

A recipe's three dtype keys (``model.dtype``, ``quant.compute_dtype``,
``lora.dtype``) default to ``auto``: bfloat16 where the device multiplies
bf16 natively, float32 where it does not. The choice is a speed decision,
not a taste: a CPU without avx512_bf16 or AMX runs torch's bf16 matmul on a
fallback kernel that converts element by element (``bench/matmul_dtypes.py``,
``bench/results/matmul-dtypes-cpu.md``: 2.6 GFLOP/s against 414 for float32 on
an Intel Xeon with oneDNN off; 2,784 against 420 with it on, where AMX does
bf16 natively). float32 on a CPU costs memory the planner does not
model (it plans bf16 activations), which a CPU run's RAM budget can spare.

An explicit ``bfloat16`` is honoured and warned about on such a CPU.
:func:`dtype_name` is the one place ``auto`` becomes a dtype (the trainer's
recipe, its model and the planner's settings all go through it);
:func:`resolve_dtypes` logs each resolution with its reason.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from qlora.train.recipe import Recipe
from quant.dtypes import DTYPES

log = logging.getLogger(__name__)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls on ``device`` run on native kernels (as fast as float32 or faster).

    CUDA: :func:`torch.cuda.is_bf16_supported`. CPU: oneDNN enabled and the
    CPU has avx512_bf16 or AMX tiles, the case in which torch routes bf16
    matmuls to oneDNN's native kernels instead of its element-wise fallback.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu" or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    cpu = torch.cpu  # private probes, present since torch 2.1; a torch without them counts as no native bf16
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def auto_dtype(device: torch.device | str) -> str:
    """What ``auto`` means on ``device``: ``bfloat16`` where it is native (every CUDA GPU: the
    fp16 fallback of GPUs without bf16 is :func:`autocast_dtype_for`'s), else ``float32``."""
    return "bfloat16" if torch.device(device).type == "cuda" or native_bf16(device) else "float32"


def dtype_name(name: str, device: torch.device | str) -> str:
    """A recipe dtype value (a name or ``auto``) as the dtype name it means on ``device``."""
    return auto_dtype(device) if name == "auto" else name


def torch_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A recipe dtype value (a name or ``auto``) as the ``torch.dtype`` it means on ``device``."""
    return DTYPES[dtype_name(name, device)]


def resolve_dtypes(recipe: Recipe, device: torch.device | str, say=log.info) -> Recipe:
    """``recipe`` with every ``auto`` dtype key resolved for ``device``; each choice logged once.

    Args:
        recipe: a validated recipe (not modified).
        device: the device the run computes on.
        say: where the one-line decision goes (``qlora train`` prints it).

    Returns:
        A recipe whose ``model.dtype``, ``quant.compute_dtype`` and ``lora.dtype`` are dtype names.
    """
    device = torch.device(device)
    values = {"model.dtype": recipe.model.dtype, "quant.compute_dtype": recipe.quant.compute_dtype,
              "lora.dtype": recipe.lora.dtype}
    auto = auto_dtype(device)
    slow = device.type == "cpu" and auto == "float32"  # a CPU without native bf16
    why = ("this CPU has no native bf16 matmul (no avx512_bf16 or AMX, or oneDNN off), where bf16 matmuls run "
           "far slower than float32 (bench/matmul_dtypes.py)" if slow else f"{device.type} computes bf16 natively")
    if any(v == "auto" for v in values.values()):
        say(f"dtypes: {', '.join(k for k, v in values.items() if v == 'auto')} auto -> {auto}: {why}")
    if slow and "bfloat16" in values.values():
        asked = ", ".join(k for k, v in values.items() if v == "bfloat16")
        log.warning("the recipe asks for bfloat16 (%s) on a CPU without native bf16 matmul: expect far slower "
                    "steps than with auto or float32 (bench/matmul_dtypes.py)", asked)
    if "auto" not in values.values():
        return recipe
    pick = {k: dtype_name(v, device) for k, v in values.items()}
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, dtype=pick["model.dtype"]),
        quant=dataclasses.replace(recipe.quant, compute_dtype=pick["quant.compute_dtype"]),
        lora=dataclasses.replace(recipe.lora, dtype=pick["lora.dtype"]),
    )


def autocast_dtype_for(device: torch.device, compute: str) -> torch.dtype:
    """The autocast dtype for compute dtype ``compute`` (a name or ``auto``) on ``device``.

    bf16 where asked; fp16 (the loop adds a gradient scaler) on a GPU without bf16.
    """
    want = torch_dtype(compute, device)
    if device.type == "cuda" and want == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: using fp16 autocast with a gradient scaler instead")
        return torch.float16
    return want
