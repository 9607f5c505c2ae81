"""What every adapter layer shares: a frozen base, two low-rank factors, and the operations on them.

:class:`AdapterLinear` is the common base of :class:`layers.lora.LoRALinear`
and :class:`layers.dora.DoRALinear`. It owns every change to an adapter
layer's state -- installing trained factors, clearing them, enabling,
freezing A (LoRA-FA), merging into the base and back -- so the code that
loads, banks or merges adapters calls methods instead of rewriting fields.
Adapters are found by type (``isinstance(m, AdapterLinear)``), never by name.
"""

from __future__ import annotations

import itertools
import math

import torch
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


def base_dtype(layer: nn.Module) -> torch.dtype:
    """The 16-bit dtype a base layer stands for: ``NF4Linear.weight_dtype`` or the ``nn.Linear`` weight's."""
    return layer.weight_dtype if hasattr(layer, "dequantize") else layer.weight.dtype


def dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` ``(out, in)`` and ``layer``'s bias (cast to the weight dtype).

    Built on meta and then given ``weight`` itself, so the only new memory is the bias copy.
    """
    bias = getattr(layer, "bias", None)
    out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(weight.dtype, copy=True), requires_grad=False)
    return out


def module_device(layer: nn.Module) -> torch.device:
    """The device of a layer's first parameter or buffer (NF4 layers hold only buffers)."""
    return next(itertools.chain(layer.parameters(), layer.buffers())).device


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


def _dropout(p: float) -> nn.Module:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise InputError(f"LoRA dropout must be a number in [0, 1), got {p!r}.")
    return nn.Dropout(p) if p > 0 else nn.Identity()


class AdapterLinear(nn.Module):
    """A frozen base linear plus ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``.

    Subclasses define ``forward`` and how the update folds into a weight
    (:meth:`_merge_fp32`). The scale ``s`` is ``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA. A is Kaiming-uniform with ``a=sqrt(5)``
    (the ``nn.Linear`` default, as loralib and PEFT do) or Gaussian with std
    ``1/r`` (PEFT's ``'gaussian'``); B is zero, so the layer starts equal to
    its base. ``init=None`` leaves A at zero and draws no random numbers,
    for callers that :meth:`install` trained factors next.

    States, each changed only by a method: ``enabled`` (:meth:`set_enabled`),
    ``merged`` (:meth:`merge` / :meth:`unmerge`), and no adapter at all
    (:meth:`clear`: ``lora_A is None``, a pass-through).

    Raises:
        InputError: rank not a positive integer, unknown init, dropout outside
            [0, 1), or a base without ``in_features``/``out_features``.
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
        self._wrap(base_layer, dropout)
        device = module_device(base_layer)
        a = torch.empty(rank, self.in_features, dtype=dtype, device=device)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        else:  # None: the caller installs trained weights next; skip the RNG draw
            a.zero_()
        self.lora_A = LoRAFactor(a)
        self.lora_B = LoRAFactor(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.alpha, self.use_rslora = float(alpha), bool(use_rslora)
        self.train(base_layer.training)  # start in the base's train/eval mode (a fresh module would be training)

    def _wrap(self, base_layer: nn.Module, dropout: float) -> None:
        """The half of construction every variant shares: freeze and keep the base, the dropout, the states.

        A variant whose trainable tensors are not two factors (:class:`layers.vera.VeRALinear`) calls this
        from its own ``__init__`` instead of :meth:`__init__`.
        """
        if not hasattr(base_layer, "in_features") or not hasattr(base_layer, "out_features"):
            raise InputError(f"LoRA needs a linear base layer with in/out features, got {type(base_layer).__name__}.")
        drop = _dropout(dropout)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)  # nothing of W0 is trained
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_dropout = drop
        self._enabled, self._merged = True, False
        self._base_norm: float | None = None
        # The original base while merged with keep_base; a plain attribute, not a submodule, so it is
        # not in state_dict and model.to() does not move it (unmerge moves it back).
        object.__setattr__(self, "_unmerged_base", None)

    @classmethod
    def passthrough(cls, base_layer: nn.Module) -> AdapterLinear:
        """A layer around ``base_layer`` with no adapter: it runs the base only.

        What a position gets while the active adapter does not cover it (the
        state-dict keys stay ``<module>.base_layer.*``). Costs a transient
        rank-1 float32 A and B, freed at once.
        """
        layer = cls(base_layer, 1, 1.0, init=None, dtype=torch.float32)
        layer.clear()
        return layer

    # ------------------------------------------------------------------ read-only state

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.weight.shape[0]

    @property
    def scale(self) -> float:
        """s = alpha/r, or alpha/sqrt(r) with rsLoRA (rank-stabilized: keeps the update's size as r grows)."""
        r = self.rank
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def merged(self) -> bool:
        """True while the update lives in the base weights (:meth:`merge`)."""
        return self._merged

    @property
    def has_adapter(self) -> bool:
        """False for a pass-through (:meth:`clear`, :meth:`passthrough`)."""
        return self.lora_A is not None

    @property
    def active(self) -> bool:
        """True when the forward pass adds an unmerged adapter update."""
        return self._enabled and not self._merged and self.has_adapter

    @property
    def can_unmerge(self) -> bool:
        """True when merged and the original base was kept (``merge(keep_base=True)``)."""
        return self._merged and self._unmerged_base is not None

    @property
    def dropout(self) -> float:
        """The adapter-input dropout probability (0.0 without dropout)."""
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    @property
    def device(self) -> torch.device:
        """Where the frozen base lives (adapters are installed next to it)."""
        return module_device(self.base_layer)

    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """``[('lora_A', A), ('lora_B', B)]``, the trained tensors by PEFT kind; empty for a pass-through."""
        if self.lora_A is None:
            return []
        return [("lora_A", self.lora_A.weight), ("lora_B", self.lora_B.weight)]

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``s·B·A`` ``(out, in)`` in ``dtype``, detached (materializes out*in values)."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scale

    @torch.no_grad()
    def base_norm(self) -> float:
        """``‖W0‖_F`` of the unmerged base, as a float; computed once (W0 is frozen) and cached.

        Costs one dense float32 copy of W0 (a dequantization for NF4) the first time.
        """
        if self._base_norm is None:
            base = self.base_layer if self._unmerged_base is None else self._unmerged_base
            self._base_norm = float(torch.linalg.vector_norm(base_weight(base, torch.float32)))
        return self._base_norm

    # ------------------------------------------------------------------ operations

    def install(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        alpha: float,
        *,
        use_rslora: bool = False,
        magnitude: torch.Tensor | None = None,
        dropout: float = 0.0,
        trainable: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Put trained factors into the layer, as new parameters on the base's device.

        ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` are copied in
        ``dtype`` (None: their own); ``magnitude`` ``(out,)`` (DoRA only) is
        copied in float32. The rank may differ from the current one. The new
        submodules follow the layer's train/eval mode. Costs one copy of the
        factors; the old parameters are dropped (an optimizer holding them
        must be rebuilt).

        Raises:
            InputError: shapes that do not fit the base, a magnitude given to
                (or missing from) the wrong layer type, a bad dropout or dtype,
                or a merged layer. Nothing is changed then.
        """
        if self._merged:
            raise InputError("Cannot install an adapter into a merged layer; unmerge it first.")
        if dtype is not None and not dtype.is_floating_point:
            raise InputError(f"Adapter dtype must be floating point (bfloat16, float16 or float32), got {dtype!r}.")
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] == 0:
            raise InputError(
                f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not (r, in) and (out, r)."
            )
        if lora_A.shape[1] != self.in_features or lora_B.shape[0] != self.out_features:
            raise InputError(
                f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a base layer with "
                f"in={self.in_features}, out={self.out_features}."
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise InputError(f"LoRA alpha must be a number, got {alpha!r}.")
        self._check_magnitude(magnitude)
        drop = _dropout(dropout)
        device = self.device

        def copy(t: torch.Tensor) -> torch.Tensor:
            # contiguous whatever the source's strides (an SVD's factors are column-major): the layer's
            # matmuls then take one path, so a resumed run replays the same arithmetic
            return t.detach().to(device=device, dtype=dtype or t.dtype, copy=True,
                                 memory_format=torch.contiguous_format)

        self.lora_A, self.lora_B = LoRAFactor(copy(lora_A), trainable), LoRAFactor(copy(lora_B), trainable)
        self._put_magnitude(magnitude, trainable)
        self.alpha, self.use_rslora, self.lora_dropout = float(alpha), bool(use_rslora), drop
        for fresh in (self.lora_A, self.lora_B, self.lora_dropout):  # new modules start in training mode;
            fresh.train(self.training)  # follow the layer's, without touching the (maybe shared) base's

    @torch.no_grad()
    def rebase(self, weight: torch.Tensor) -> None:
        """Make ``weight`` ``(out, in)`` the frozen base: re-quantized for a 4-bit base, copied for a dense one.

        For the inits that move part of ``W`` into the adapter (:mod:`layers.inits`); the base keeps its
        format, dtype and device.

        Raises:
            InputError: a merged layer, a weight of another shape, or a base that is neither.
        """
        if self._merged:
            raise InputError("Cannot rebase a merged layer; unmerge it first.")
        base = self.base_layer
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InputError(f"rebase got a {tuple(weight.shape)} weight for a layer with "
                             f"in={self.in_features}, out={self.out_features}.")
        if hasattr(base, "requantize"):
            base.requantize(weight)
        elif isinstance(base, nn.Linear):
            base.weight.copy_(weight.to(base.weight.dtype))
        else:
            raise InputError(f"Cannot rebase a {type(base).__name__} base; it is neither nn.Linear nor 4-bit.")
        self._base_norm = None  # W0 changed

    def clear(self) -> None:
        """Drop the adapter: the layer becomes a pass-through running only its base."""
        self.lora_A = self.lora_B = None
        self._put_magnitude(None, False)

    def set_enabled(self, enabled: bool) -> bool:
        """Run the adapter (True) or the base only (False); returns the previous setting."""
        before, self._enabled = self._enabled, bool(enabled)
        return before

    def freeze_A(self) -> None:
        """LoRA-FA: A stays at its current values and only B (and DoRA's m) train. No-op for a pass-through."""
        if self.lora_A is not None:
            self.lora_A.weight.requires_grad_(False)

    def follow_base_device(self) -> None:
        """Move the adapter's tensors to the base's device, in place (the same Parameter objects).

        ``model.to()`` moves only the modules inside the model; an adapter
        kept aside (a multi-adapter bank) calls this when it goes back in, so
        an optimizer built on its parameters keeps pointing at them.
        """
        device = self.device
        for _, p in self.adapter_tensors():
            if p.device != device:
                p.data = p.data.to(device)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight with the update folded in ``(out, in)``: float32 math, rounded once to ``dtype``.

        ``dtype`` defaults to the base's 16-bit dtype. Costs one float32
        ``out*in`` temporary (W0, updated in place) plus the result.

        Raises:
            InputError: a pass-through layer (nothing to merge).
        """
        if not self.has_adapter:
            raise InputError("This layer has no adapter (a pass-through); there is nothing to merge.")
        w = self._merge_fp32(base_weight(self.base_layer, torch.float32))
        return w.to(dtype or base_dtype(self.base_layer))

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        """Fold the update into the base; afterwards the layer runs only its (dense) base.

        ``keep_base=True`` swaps in a dense 16-bit ``nn.Linear`` holding W'
        and keeps the original base aside (one dense 16-bit weight extra
        while merged), so :meth:`unmerge` restores it bit for bit (for NF4
        that is the untouched 4-bit layer). ``keep_base=False`` overwrites
        an ``nn.Linear`` base in place (no extra memory, not reversible); an
        NF4 base is dropped for the dense one.

        Raises:
            InputError: nothing to merge (already merged, disabled, or a pass-through).
        """
        if not self.active:
            state = "already merged" if self._merged else "disabled" if not self._enabled else "a pass-through"
            raise InputError(f"Cannot merge this layer: it is {state}.")
        base = self.base_layer
        w = self.merged_weight()
        if isinstance(base, nn.Linear) and not keep_base:
            base.weight.data.copy_(w)
        else:
            if keep_base:
                object.__setattr__(self, "_unmerged_base", base)  # not a submodule: see __init__
            self.base_layer = dense_linear(base, w)
        self._merged = True

    def unmerge(self) -> None:
        """Restore the base kept by :meth:`merge`, moved to the merged layer's device.

        Raises:
            InputError: the layer is not merged, or was merged with ``keep_base=False``.
        """
        if not self._merged:
            raise InputError("Cannot unmerge this layer: it is not merged.")
        if self._unmerged_base is None:
            raise InputError("This layer was merged with keep_base=False; its original weights are gone.")
        self.base_layer = self._unmerged_base.to(self.base_layer.weight.device)
        object.__setattr__(self, "_unmerged_base", None)
        self._merged = False

    # ------------------------------------------------------------------ variant hooks

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        """The merged float32 weight from a fresh float32 W0 (which it may overwrite)."""
        raise NotImplementedError

    def _check_magnitude(self, magnitude: torch.Tensor | None) -> None:
        if magnitude is not None:
            raise InputError(
                f"{type(self).__name__} holds no DoRA magnitude vector; a DoRA adapter goes into a DoRALinear."
            )

    def _put_magnitude(self, magnitude: torch.Tensor | None, trainable: bool) -> None:
        """Install (or with None, drop) the variant's extra tensors; plain LoRA has none."""

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale if self.rank else 0:.4g}{rs}"
