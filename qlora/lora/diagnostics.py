"""Per-module adapter health numbers, cheap enough to log during training.

- ``update_ratio = ‖s·B·A‖_F / ‖W0‖_F``: how large the learned update is next
  to the frozen weight. ``‖B·A‖_F² = tr((BᵀB)(AAᵀ))``, the trace of a product
  of two ``r×r`` Gram matrices, costs ``O(r²·(in+out))`` and never builds the
  ``out×in`` product. ``‖W0‖_F`` needs the dense base once (one
  dequantization and an ``out*in`` float32 temporary for an NF4 base); W0 is
  frozen, so the layer computes it once and caches it
  (:meth:`layers.base.AdapterLinear.base_norm`).
- ``grad_ratio = ‖∇A‖_F / ‖∇B‖_F`` from the current ``.grad`` (None before the
  first backward or for a frozen A under LoRA-FA). With B at zero, ∇A is zero
  at the first step, so this starts at 0 and its trend is what to watch
  (LoRA+ exists because B usually needs the larger step).

For DoRA modules the ratio describes the ``s·B·A`` part only; the magnitude
vector rescales rows on top of it. For VeRA modules the update is
``(b⊙B)·(d⊙A)`` and the gradient ratio is ``‖∇d‖ / ‖∇b‖`` (d scales A's rows, b B's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers.base import AdapterLinear
from layers.vera import VeRALinear
from qlora.lora.surgery import lora_modules


@dataclass(frozen=True)
class ModuleDiagnostics:
    """One module's numbers (norms are Frobenius norms, as Python floats)."""

    name: str
    update_norm: float  # ‖s·B·A‖_F
    base_norm: float  # ‖W0‖_F
    update_ratio: float  # update_norm / base_norm
    grad_A_norm: float | None
    grad_B_norm: float | None
    grad_ratio: float | None  # ‖∇A‖ / ‖∇B‖; inf when ∇B is zero and ∇A is not


@torch.no_grad()
def update_norm(module: AdapterLinear) -> float:
    """``‖s·B·A‖_F`` via ``sqrt(tr((BᵀB)(AAᵀ)))``, float32 math, no ``out×in`` temporary."""
    if isinstance(module, VeRALinear):
        a, b = module.lora_factors()  # float32 (r, in) and (out, r), scale 1
    else:
        a, b = module.lora_A.weight.float(), module.lora_B.weight.float()
    gram = (b.T @ b) * (a @ a.T)  # elementwise product of symmetric r×r matrices; its sum is the trace
    return abs(module.scale) * float(gram.sum().clamp_min(0).sqrt())


def _grad_norm(p: torch.Tensor) -> float | None:
    return None if p.grad is None else float(torch.linalg.vector_norm(p.grad.float()))


def lora_diagnostics(model: nn.Module) -> list[ModuleDiagnostics]:
    """``update_ratio`` and ``grad_ratio`` (with their parts) for every module with an adapter."""
    out = []
    for name, m in lora_modules(model):
        if not m.has_adapter:
            continue
        u, w = update_norm(m), m.base_norm()
        if isinstance(m, VeRALinear):
            ga, gb = _grad_norm(m.vera_lambda_d), _grad_norm(m.vera_lambda_b)
        else:
            ga, gb = _grad_norm(m.lora_A.weight), _grad_norm(m.lora_B.weight)
        if ga is None or gb is None:
            gr = None
        else:
            gr = ga / gb if gb > 0 else (float("inf") if ga > 0 else 0.0)
        out.append(ModuleDiagnostics(name, u, w, u / w if w > 0 else float("inf"), ga, gb, gr))
    return out


def summarize(diags: list[ModuleDiagnostics]) -> dict[str, float]:
    """Mean and max of both ratios over modules, for one log line (keys ``update_ratio_mean`` ...)."""
    out: dict[str, float] = {}
    for key in ("update_ratio", "grad_ratio"):
        vals = [getattr(d, key) for d in diags if getattr(d, key) is not None]
        if vals:
            out[f"{key}_mean"] = sum(vals) / len(vals)
            out[f"{key}_max"] = max(vals)
    return out
