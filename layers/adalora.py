"""AdaLoRA's layer (Zhang et al., 2023): the update in SVD form ``P·Λ·Q``, as PEFT computes it.

``h = W0·x + (alpha / (r0 + 1e-5))·B·((A·x) ⊙ E)``, with ``A`` ``(r, in)`` (PEFT's Q), ``E``
``(r, 1)`` the singular values Λ and ``B`` ``(out, r)`` (P). ``r0`` (``ranknum``) is the rank the
adapter started with: the scale does not change as triplets are pruned, so pruning one removes just
its term. A and B start Gaussian (std 0.02) and E at zero, so the layer starts equal to its base.

Pruning is a mask on E (:meth:`AdaLoRALinear.mask`): a pruned triplet's singular value is set to
zero; its A row and B column stay (they may come back at the next allocation, as in PEFT). Which
triplets to keep is the rank allocator's business (:mod:`qlora.lora.adalora`); the layer only
scores nothing and prunes what it is told.

Cost against LoRA: ``r`` more numbers per layer (E, float32 like DoRA's magnitude: it is few
numbers and small updates to it must not round away), and backward keeps two ``(..., r)``
products (``A·x`` for E's gradient, ``(A·x) ⊙ E`` for B's) where LoRA keeps one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import AdapterLinear
from quant.errors import InputError

INIT_STD = 0.02  # PEFT's normal init of A and B


class AdaLoRALinear(AdapterLinear):
    """A frozen base plus ``lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)`` and ``lora_B`` ``(out, r)`` (module docstring).

    Args:
        base_layer, rank, alpha, dropout, dtype: as :class:`layers.lora.LoRALinear` (``rank`` is the
            starting rank r0; A and B are in ``dtype``, E float32).
        init: ``'gaussian'`` (PEFT's: A and B normal with std 0.02, E zero) or None (zeros: trained
            values come next).

    Raises:
        InputError: an init other than gaussian/None, or as :class:`layers.lora.LoRALinear`.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 init: str | None = "gaussian", dtype: torch.dtype = torch.bfloat16):
        if init not in ("gaussian", None):
            raise InputError(f"AdaLoRA starts from its own init (A and B Gaussian, E zero), got init {init!r}.")
        super().__init__(base_layer, rank, alpha, dropout, False, None, dtype)  # A, B zero, no RNG draw yet
        if init == "gaussian":
            with torch.no_grad():
                self.lora_A.weight.normal_(0.0, INIT_STD)
                self.lora_B.weight.normal_(0.0, INIT_STD)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, dtype=torch.float32, device=self.lora_A.weight.device))
        self.ranknum = float(rank)  # r0: the scale's denominator, fixed as triplets are pruned

    @property
    def scale(self) -> float:
        """``alpha / (r0 + 1e-5)``: PEFT's AdaLoRA scale, fixed by the starting rank."""
        return self.alpha / (self.ranknum + 1e-5)

    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """A, B and ``('lora_E', E)``; empty for a pass-through."""
        out = super().adapter_tensors()
        return (out + [("lora_E", self.lora_E)]) if out else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        a, b, e = self.lora_A.weight, self.lora_B.weight, self.lora_E
        h = F.linear(self.lora_dropout(x).to(a.dtype), a) * e.view(-1).to(a.dtype)  # (..., r): A·x scaled by Λ
        return result + (F.linear(h, b) * self.scale).to(result.dtype)

    @torch.no_grad()
    def mask(self, keep: torch.Tensor) -> None:
        """Prune: set E to zero where ``keep`` ``(r,)`` (bool) is False. A and B stay (see the module docstring).

        Raises:
            InputError: a mask of another length.
        """
        if tuple(keep.shape) != (self.rank,):
            raise InputError(f"An AdaLoRA mask for this layer needs shape ({self.rank},), got {tuple(keep.shape)}.")
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device).view(-1, 1), 0.0)

    def load_svd(self, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_E: torch.Tensor, alpha: float,
                 ranknum: float, trainable: bool = False, dtype: torch.dtype | None = None) -> None:
        """Put trained ``A`` ``(r, in)``, ``B`` ``(out, r)``, ``E`` ``(r, 1)`` in, with the starting rank ``ranknum``.

        Raises:
            InputError: shapes that do not fit the base or each other, or a merged layer.
        """
        if tuple(lora_E.shape) != (lora_A.shape[0], 1):
            raise InputError(f"lora_E {tuple(lora_E.shape)} does not fit lora_A {tuple(lora_A.shape)}: it must be "
                             "(r, 1).")
        super().install(lora_A, lora_B, alpha, trainable=trainable, dtype=dtype, dropout=self.dropout)
        e = lora_E.detach().to(device=self.device, dtype=torch.float32, copy=True)
        self.lora_E = nn.Parameter(e, requires_grad=trainable)
        self.ranknum = float(ranknum)

    def install(self, *args, **kwargs) -> None:
        raise InputError("An AdaLoRA layer takes its trained A, B and E with load_svd; a PEFT AdaLoRA file is read "
                         "as the LoRA it equals.")

    def clear(self) -> None:
        super().clear()
        self.lora_E = None

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(A ⊙ E, B)``: the same update as a LoRA with this layer's scale."""
        return self.lora_A.weight.float() * self.lora_E.float(), self.lora_B.weight.float()

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a, b = self.lora_factors()
        return ((b @ a) * self.scale).to(dtype)

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_factors()
        return w0.addmm_(b, a, alpha=self.scale)

    def extra_repr(self) -> str:
        kept = 0 if self.lora_E is None else int((self.lora_E != 0).sum())
        return super().extra_repr() + f", adalora r0={self.ranknum:g}, nonzero E={kept}"
