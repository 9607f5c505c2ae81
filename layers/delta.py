"""Delta-LoRA (Zi et al., 2023), with the base's updates kept implicit so that the base stays frozen.

Delta-LoRA trains A and B as LoRA does and, after every optimizer step, adds λ times the change of
the adapter's product to the base weight: ``W ← W + λ·s·(B'·A' − B·A)``. Summed over the steps that
is ``W_t = W_0 + λ·s·(B_t·A_t − B_0·A_0)``, and with B starting at zero ``W_t = W_0 + λ·s·B_t·A_t``:
the base's whole update is the adapter's own product, times λ. So this layer never writes into W.
It runs::

    h = W0·x + (1 + λ)·s·B·A·x        forward: the base's update plus the adapter's
    ∂/∂(A, B) as for s·B·A·x           backward: W gets no gradient, as in Delta-LoRA,
    ∂/∂x through all of it             but the input's gradient flows through W's update too

which gives exactly the forward values and the gradients of updating W after every step, without
a dense trainable W (or its per-step re-quantization on a 4-bit base), and with resumes that
replay bit for bit. As the paper does, it takes no dropout on the adapter input: the base's update
is the product on the whole input.

Cost: the tensors LoRA keeps for backward (the input and the ``(..., r)`` product ``A·x``); the
merged or saved update is LoRA's with ``alpha·(1 + λ)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.lora import LoRALinear
from quant.errors import InputError


class _DeltaProduct(torch.autograd.Function):
    """``(1+λ)·s·B·A·x`` whose gradients are Delta-LoRA's: ``s·∂`` for A and B, ``(1+λ)·s·∂`` for x.

    The input's gradient goes through the whole update, because the base's implicit part is part of
    the network; A and B get only the adapter's own share, because W gets no gradient in Delta-LoRA.
    Autograd cannot split one product that way, so backward is written out. It keeps what LoRA's
    autograd keeps: the input ``x`` and the ``(..., r)`` product ``A·x``.
    """

    @staticmethod
    def forward(ctx, x, a, b, scale: float, ratio: float):
        ax = F.linear(x, a)  # (..., r)
        ctx.save_for_backward(x, a, b, ax)
        ctx.scale, ctx.ratio = scale, ratio
        return F.linear(ax, b) * ((1.0 + ratio) * scale)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, ax = ctx.saved_tensors
        g_ax = grad @ b  # (..., r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_ax @ a) * ((1.0 + ctx.ratio) * ctx.scale)
        if ctx.needs_input_grad[1]:
            grad_a = (g_ax.flatten(0, -2).T @ x.flatten(0, -2)) * ctx.scale
        if ctx.needs_input_grad[2]:
            grad_b = (grad.flatten(0, -2).T @ ax.flatten(0, -2)) * ctx.scale
        return grad_x, grad_a, grad_b, None, None


class DeltaLoRALinear(LoRALinear):
    """LoRA whose base follows the adapter: ``h = W0·x + (1+λ)·s·B·A·x``, gradients of ``s·B·A·x`` (module docstring).

    Args:
        base_layer, rank, alpha, use_rslora, init, dtype: as :class:`layers.lora.LoRALinear`.
        delta_ratio: λ >= 0, how much of the adapter's change goes into the base (0: plain LoRA).

    Raises:
        InputError: λ not a number >= 0, or as :class:`layers.lora.LoRALinear`.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, use_rslora: bool = False,
                 init: str | None = "kaiming", dtype: torch.dtype = torch.bfloat16, delta_ratio: float = 1.0):
        super().__init__(base_layer, rank, alpha, 0.0, use_rslora, init, dtype)
        if not isinstance(delta_ratio, (int, float)) or isinstance(delta_ratio, bool) or not delta_ratio >= 0:
            raise InputError(f"Delta-LoRA's delta_ratio (λ) must be a number >= 0, got {delta_ratio!r}.")
        self.delta_ratio = float(delta_ratio)

    @property
    def saved_alpha(self) -> float:
        """The alpha of the plain LoRA adapter that equals this layer on the original base: ``alpha·(1+λ)``."""
        return self.alpha * (1.0 + self.delta_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        a, b = self.lora_A.weight, self.lora_B.weight
        h = _DeltaProduct.apply(x.to(a.dtype), a, b, self.scale, self.delta_ratio)
        return result + h.to(result.dtype)

    def install(self, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, *, dropout: float = 0.0,
                **kwargs) -> None:
        """As :meth:`layers.base.AdapterLinear.install`; ``alpha`` is the adapter's own (not :attr:`saved_alpha`).

        Raises:
            InputError: a dropout other than 0 (Delta-LoRA takes none), or as the base method.
        """
        if dropout:
            raise InputError(f"Delta-LoRA takes no adapter dropout (the base's update is the product on the whole "
                             f"input), got {dropout!r}.")
        super().install(lora_A, lora_B, alpha, dropout=0.0, **kwargs)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole update against the original base, ``(1+λ)·s·B·A`` ``(out, in)``, detached."""
        return super().delta_weight(dtype) * (1.0 + self.delta_ratio)

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        return w0.addmm_(self.lora_B.weight.float(), self.lora_A.weight.float(),
                         alpha=(1.0 + self.delta_ratio) * self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", delta_ratio={self.delta_ratio:g}"
