"""The LoRA layer: a frozen base linear plus a trainable low-rank update."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layers.base import AdapterLinear


class LoRALinear(AdapterLinear):
    """``h = W0·x + s·B·A·dropout(x)`` around a frozen base linear layer.

    The base (``nn.Linear`` or ``quant.NF4Linear``) is kept as ``base_layer``
    and frozen; only ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
    ``(out, r)`` are trainable. ``s`` is ``alpha / r``, or ``alpha / sqrt(r)``
    with rsLoRA. Initialization, installing trained factors, merging,
    enabling and LoRA-FA are :class:`layers.base.AdapterLinear`'s.

    Args:
        base_layer: the frozen linear (its parameters get ``requires_grad=False``).
        rank: r > 0.
        alpha: the scale's numerator.
        dropout: probability in [0, 1) on the adapter input (training mode only).
        use_rslora: scale ``alpha / sqrt(r)``.
        init: ``'kaiming'``, ``'gaussian'``, or None (A left at zero: trained factors come next).
        dtype: the adapter's dtype (bf16 by default).

    Input ``(..., in)`` of any float dtype; output ``(..., out)`` in the
    base layer's output dtype. The adapter path runs in the adapter's dtype
    and is cast to the output dtype once.

    Raises:
        InputError: rank <= 0, unknown init, dropout outside [0, 1), or a
            base without in/out features.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        a, b = self.lora_A.weight, self.lora_B.weight
        # two thin matmuls, never the out*in product: saves the (..., r) activation, not a dense update
        h = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), b) * self.scale
        return result + h.to(result.dtype)

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        """``W0 + s·B·A`` in float32, accumulated into ``w0`` in place (no second out*in temporary)."""
        return w0.addmm_(self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scale)
