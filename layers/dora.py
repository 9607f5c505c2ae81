"""DoRA: weight-decomposed LoRA (Liu et al., 2024), as PEFT computes it.

The adapted weight is ``W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖``, where the norm
is taken per output row (``(out,)``; the paper's "column" norm of the
``(in, out)`` matrix) and ``m`` (``lora_magnitude_vector``, float32 ``(out,)``) starts
as that norm, so the layer is unchanged at initialization. Following §4.3 of
the paper (and PEFT), the norm is treated as a constant in backward.

Forward, with ``y0 = W0·x`` (base output without bias) and ``g = m/‖·‖``:
``h = base(x) + (g - 1)·y0 + g·s·B·A·x``; with active dropout ``y0`` is
recomputed on the dropped-out input, exactly as PEFT does, so logits agree.

Cost: the norm needs the dense base weight every forward, i.e. one
dequantization plus one float32 ``out*in`` temporary per DoRA layer (PEFT
pays the same; plain LoRA pays neither). The ``(out,)`` ratio ``g`` is
computed in float32: in bf16, ``g - 1`` near 1 would be quantized to steps
of 2**-8.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from layers.lora import LoRALinear, base_weight

log = logging.getLogger(__name__)


@torch.no_grad()
def dora_weight_norm(module: LoRALinear, base: torch.Tensor | None = None) -> torch.Tensor:
    """Row norms ``‖W0 + s·B·A‖`` as float32 ``(out,)``, detached.

    ``base``: the dense float32 W0 ``(out, in)`` if the caller has it already
    (merging), else it is built here (one dequantization for NF4 bases).
    """
    w = base_weight(module.base_layer, torch.float32) if base is None else base.float().clone()
    w.addmm_(module.lora_B.weight.float(), module.lora_A.weight.float(), alpha=module.scale)
    return torch.linalg.vector_norm(w, dim=1)


def enable_dora(module: LoRALinear) -> None:
    """Add ``lora_magnitude_vector``: float32 ``(out,)``, set to the current row norms.

    float32 whatever the adapter dtype: it is only ``out`` numbers, and in
    bf16 ``m/‖·‖`` would be off by up to 2**-9 at init (the model would not
    start unchanged) and small updates to m would round away.
    """
    m = dora_weight_norm(module)
    module.lora_magnitude_vector = nn.Parameter(m, requires_grad=True)


def dora_forward(module: LoRALinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """DoRA output ``(..., out)`` given the base output ``result`` (bias included) for input ``x``."""
    a, b, mag = module.lora_A.weight, module.lora_B.weight, module.lora_magnitude_vector
    dt = a.dtype
    ratio = mag.float() / dora_weight_norm(module)  # float32 (out,), gradient flows to mag only
    bias = getattr(module.base_layer, "bias", None)
    x_d = module.lora_dropout(x)
    if isinstance(module.lora_dropout, nn.Identity) or not module.training:
        y0 = result if bias is None else result - bias
    else:  # dropout changes the input, so W0·x must be recomputed on it (as PEFT does)
        y0 = module.base_layer(x_d)
        y0 = y0 if bias is None else y0 - bias
    lora = F.linear(F.linear(x_d.to(dt), a), b)
    h = (ratio - 1).to(dt) * y0.to(dt) + ratio.to(dt) * lora * module.scale
    return result + h.to(result.dtype)


@torch.no_grad()
def dora_merged_weight(module: LoRALinear, base: torch.Tensor) -> torch.Tensor:
    """The merged float32 weight ``m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖`` ``(out, in)`` from float32 ``base``."""
    w = base.float().clone()
    w.addmm_(module.lora_B.weight.float(), module.lora_A.weight.float(), alpha=module.scale)
    norm = torch.linalg.vector_norm(w, dim=1)
    return w * (module.lora_magnitude_vector.float() / norm).unsqueeze(1)
