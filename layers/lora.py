"""The LoRA layer: a frozen base linear plus a trainable low-rank update."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import InputError, choices

INITS = ("kaiming", "gaussian")


def base_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh dense copy of a base layer's weight ``(out, in)`` in ``dtype``.

    ``NF4Linear`` is dequantized (values computed in float32, rounded once);
    an ``nn.Linear`` weight is copied. Costs one ``out*in`` tensor of ``dtype``.
    """
    if hasattr(layer, "dequantize"):
        return layer.dequantize(dtype)
    return layer.weight.detach().to(dtype, copy=True)


class LoRAFactor(nn.Module):
    """One low-rank factor holding a bare ``weight``.

    Not an ``nn.Linear`` on purpose: code that collects linear layers by type
    (quantization, target resolution) must never mistake an adapter factor
    for a base layer. The attribute name keeps the state-dict key
    ``<module>.lora_A.weight``, which is PEFT's key minus its prefix.
    """

    def __init__(self, weight: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


class LoRALinear(nn.Module):
    """``h = W0·x + s·B·A·dropout(x)`` around a frozen base linear layer.

    The base (``nn.Linear`` or ``quant.NF4Linear``) is kept as ``base_layer``
    and frozen; only ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight``
    ``(out, r)`` are trainable (plus ``lora_magnitude_vector`` ``(out,)``
    once DoRA is enabled by :func:`layers.dora.enable_dora`). ``s`` is
    ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    A is Kaiming-uniform with ``a=sqrt(5)`` (the ``nn.Linear`` default, as the
    reference loralib code and PEFT do) or Gaussian with std ``1/r`` (PEFT's
    ``'gaussian'``; the paper's choice); B is zero, so the
    layer equals its base at initialization. ``init=None`` leaves A at zero
    for callers that install trained weights (no random numbers drawn).

    Input ``(..., in)`` of any float dtype; output ``(..., out)`` in the
    base layer's output dtype. The adapter path runs in the adapter's dtype
    (``dtype``, bf16 by default) and is cast to the output dtype once.

    Flags: ``enabled`` (False: base only), ``merged`` (set by
    :mod:`qlora.adapters.merging`: the update already lives in the base weights).
    A module with ``lora_A is None`` (an adapter that does not cover it, see
    :mod:`qlora.adapters.multi`) is a pass-through.

    Raises:
        InputError: rank <= 0, unknown init, or a base without in/out features.
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
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InputError(f"LoRA rank must be a positive integer, got {rank!r}.")
        if init is not None and init not in INITS:
            raise InputError(f"Unknown LoRA init {init!r}; valid choices are {choices(INITS)}.")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
        if not hasattr(base_layer, "in_features") or not hasattr(base_layer, "out_features"):
            raise InputError(f"LoRA needs a linear base layer with in/out features, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)  # nothing of W0 is trained
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        a = torch.empty(rank, self.in_features, dtype=dtype, device=device)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        else:  # None: the caller installs trained weights next; skip the RNG draw
            a.zero_()
        self.lora_A = LoRAFactor(a)
        self.lora_B = LoRAFactor(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.alpha, self.use_rslora = float(alpha), bool(use_rslora)
        self.enabled, self.merged = True, False

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.weight.shape[0]

    @property
    def scale(self) -> float:
        """s = alpha/r, or alpha/sqrt(r) with rsLoRA (rank-stabilized: keeps the update's size as r grows)."""
        r = self.rank
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r

    @property
    def active(self) -> bool:
        """True when the forward pass adds an unmerged adapter update."""
        return self.enabled and not self.merged and self.lora_A is not None

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``s·B·A`` ``(out, in)`` in ``dtype``, detached (materializes out*in values)."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        if self.lora_magnitude_vector is not None:
            from layers.dora import dora_forward  # DoRA lives in its own module

            return dora_forward(self, x, result)
        a, b = self.lora_A.weight, self.lora_B.weight
        h = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), b) * self.scale
        return result + h.to(result.dtype)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        rs = ", rslora" if self.use_rslora else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale if self.rank else 0:.4g}{rs}{dora}"
