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

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import AdapterLinear, base_weight
from quant.errors import InputError


class DoRALinear(AdapterLinear):
    """LoRA plus a trainable float32 magnitude ``lora_magnitude_vector`` ``(out,)`` (see the module docstring).

    Arguments as :class:`layers.lora.LoRALinear`. ``m`` starts as the row
    norms of ``W0 + s·B·A`` (one dequantization at construction); with
    ``init=None`` it starts at zero, for callers that :meth:`install` a
    trained adapter next. float32 whatever the adapter dtype: it is only
    ``out`` numbers, and in bf16 ``m/‖·‖`` would be off by up to 2**-9 at
    init (the model would not start unchanged) and small updates to m would
    round away.

    Input ``(..., in)``, output ``(..., out)`` in the base's output dtype.

    Raises:
        InputError: as :class:`layers.lora.LoRALinear`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | None = "kaiming",
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init, dtype)
        if init is None:  # trained values come next: skip the dequantization the norm costs
            m = torch.zeros(self.out_features, dtype=torch.float32, device=self.lora_A.weight.device)
        else:
            m = self.weight_norm()
        self.lora_magnitude_vector = nn.Parameter(m, requires_grad=True)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """Row norms ``‖W0 + s·B·A‖`` as float32 ``(out,)``, detached (one dense float32 W0)."""
        w = base_weight(self.base_layer, torch.float32)
        w.addmm_(self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scale)
        return torch.linalg.vector_norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        return self._add_update(x, result)

    def _add_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output ``(..., out)`` from the input and the base output ``result`` (bias included).

        Its own frame on purpose: its temporaries are freed before ``result``, the order the
        planner's recorded DoRA timelines (tests/memory/test_probe_layers.py) were taken in.
        """
        a, b, mag = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        dt = a.dtype
        ratio = mag.float() / self.weight_norm()  # float32 (out,), gradient flows to mag only
        bias = getattr(self.base_layer, "bias", None)
        x_d = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            y0 = result if bias is None else result - bias
        else:  # dropout changes the input, so W0·x must be recomputed on it (as PEFT does)
            y0 = self.base_layer(x_d)
            y0 = y0 if bias is None else y0 - bias
        lora = F.linear(F.linear(x_d.to(dt), a), b)
        h = (ratio - 1).to(dt) * y0.to(dt) + ratio.to(dt) * lora * self.scale
        return result + h.to(result.dtype)

    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """A, B and ``('lora_magnitude_vector', m)``; empty for a pass-through."""
        out = super().adapter_tensors()
        return (out + [("lora_magnitude_vector", self.lora_magnitude_vector)]) if out else out

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        """``m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖`` in float32, computed in ``w0``'s storage."""
        w = w0.addmm_(self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scale)
        norm = torch.linalg.vector_norm(w, dim=1)
        return w.mul_((self.lora_magnitude_vector.float() / norm).unsqueeze(1))

    def _check_magnitude(self, magnitude: torch.Tensor | None) -> None:
        if magnitude is None or tuple(magnitude.shape) != (self.out_features,):
            got = None if magnitude is None else tuple(magnitude.shape)
            raise InputError(
                f"A DoRA layer needs a lora_magnitude_vector of shape ({self.out_features},), got {got}; "
                "a plain LoRA adapter goes into a LoRALinear."
            )

    def _put_magnitude(self, magnitude: torch.Tensor | None, trainable: bool) -> None:
        if magnitude is None:
            self.lora_magnitude_vector = None
            return
        m = magnitude.detach().to(device=self.device, dtype=torch.float32, copy=True)  # float32: see the class
        self.lora_magnitude_vector = nn.Parameter(m, requires_grad=trainable)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
