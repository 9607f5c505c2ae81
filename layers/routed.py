"""Many adapters in one batch: every row runs the shared base plus the update of the adapter it names.

Multi-tenant servers (Punica, S-LoRA, vLLM's multi-LoRA) batch requests for different adapters: one
base matmul for the whole batch, then a low-rank update gathered per row. :class:`RoutedLinear` is
that in plain torch, so it runs on any device, the CPU included:

- the K adapters of one position are stacked and zero-padded to the largest rank R:
  ``A (K+1, R, in)``, ``B (K+1, out, R)``. Slot 0 is all zeros: the rows that name no adapter.
  Padding is exact (a zero rank adds exact zeros to each sum), so adapters of different ranks share
  one stack, and an adapter that does not cover this position is a zero slot too.
- a forward gathers each row's A and B by its slot (``route (batch,)``) and runs two batched
  matmuls, ``(b, t, in) @ (b, in, R) -> (b, t, R) @ (b, R, out)``: the base's weight is read once
  for the whole batch, each adapter's factors once per row that uses them.
- DoRA rows are scaled by ``g = m / ‖W0 + s·B·A‖`` (float32 ``(out,)`` per adapter, computed here once:
  served adapters are frozen, so the dense base weight DoRA's training forward rebuilds every step is
  built once per adapter at construction); LoRA rows and rows with no adapter have ``g = 1``, which
  leaves their arithmetic that of a plain LoRA layer.

Cost: the stacks are a copy of the adapters (padded to R), and a forward holds the gathered factors,
``b·R·(in + out)`` values, for the duration of the layer. Inference only: no gradient, no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layers.base import AdapterLinear, module_device
from layers.dora import DoRALinear
from layers.lora import LoRALinear
from quant.errors import InputError


class RoutedLinear(nn.Module):
    """A frozen base linear plus K stacked adapters; each row of the batch takes the one :meth:`set_route` names.

    Args:
        base_layer: the shared frozen linear (``nn.Linear`` or ``quant.NF4Linear``); kept, not copied.
        adapters: one entry per adapter slot 1..K: a :class:`layers.lora.LoRALinear` or
            :class:`layers.dora.DoRALinear` around ``base_layer`` (its factors are copied into the
            stacks), or None where that adapter does not cover this layer.

    Input ``(batch, ..., in)``; output ``(batch, ..., out)`` in the base's output dtype. The update runs in
    the adapters' dtype (the widest of them when they differ) and is cast to the output dtype once.

    Raises:
        InputError: an adapter of another kind (VeRA, AdaLoRA and Delta-LoRA layers are served from their
            saved files, which load as LoRA), a merged one, or one that does not wrap ``base_layer``.
    """

    def __init__(self, base_layer: nn.Module, adapters: Sequence[AdapterLinear | None]):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        held = [a for a in adapters if a is not None and a.has_adapter]
        for a in held:
            if type(a) not in (LoRALinear, DoRALinear) or a.merged or a.base_layer is not base_layer:
                why = ("merged" if a.merged else "around another base" if a.base_layer is not base_layer
                       else "a " + type(a).__name__)
                raise InputError(f"A routed layer takes unmerged LoRA or DoRA adapters around its base; got one "
                                 f"{why}. Serve VeRA, AdaLoRA and Delta-LoRA adapters from their saved files "
                                 "(they load as LoRA).")
        # one dtype: the update runs in it, as each adapter alone does; mixed: the widest of them
        dt = held[0].lora_A.weight.dtype if held else torch.float32
        for a in held[1:]:
            dt = torch.promote_types(dt, a.lora_A.weight.dtype)
        rank, device = max((a.rank for a in held), default=1), module_device(base_layer)
        k = len(adapters) + 1
        a_stack = torch.zeros(k, rank, self.in_features, dtype=dt, device=device)
        b_stack = torch.zeros(k, self.out_features, rank, dtype=dt, device=device)
        scale = torch.zeros(k, dtype=torch.float32, device=device)
        gain = torch.ones(k, self.out_features, dtype=torch.float32, device=device)
        with torch.no_grad():
            for slot, a in enumerate(adapters, start=1):
                if a is None or not a.has_adapter:
                    continue
                a_stack[slot, : a.rank] = a.lora_A.weight
                b_stack[slot, :, : a.rank] = a.lora_B.weight
                scale[slot] = a.scale
                if isinstance(a, DoRALinear):  # m / ‖W0 + s·B·A‖, once: one dense float32 W0 per DoRA adapter
                    gain[slot] = a.lora_magnitude_vector.float() / a.weight_norm()
        self.held, self.dora = bool(held), any(isinstance(a, DoRALinear) for a in held)
        # buffers, so model.to() moves them; not persistent: a routed layer is never saved
        for name, t in (("a_stack", a_stack), ("b_stack", b_stack), ("scale", scale), ("gain", gain)):
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("route", None, persistent=False)

    @property
    def slots(self) -> int:
        """K, the number of adapter slots (slot 0, no adapter, not counted)."""
        return self.a_stack.shape[0] - 1

    def set_route(self, route: torch.Tensor | None) -> None:
        """Which slot each row of the next inputs takes: int64 ``(batch,)`` in ``0..K`` (0: the base alone).

        Raises:
            InputError: not a 1-d integer tensor, or a slot outside ``0..K``.
        """
        if route is not None:
            if route.ndim != 1 or route.dtype not in (torch.int64, torch.int32) or route.numel() == 0:
                raise InputError(f"A route is a 1-d integer tensor with one slot per row, got {route.dtype} "
                                 f"of shape {tuple(route.shape)}.")
            lo, hi = int(route.min()), int(route.max())
            if lo < 0 or hi > self.slots:
                raise InputError(f"Route slots must be in 0..{self.slots} (0: no adapter), got {lo}..{hi}.")
            route = route.to(device=self.a_stack.device, dtype=torch.int64)
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        route = self.route
        if route is None:
            raise InputError("A routed layer runs only after set_route (the batch's adapter per row).")
        if route.shape[0] != x.shape[0]:
            raise InputError(f"The route names {route.shape[0]} rows but the input has {x.shape[0]}.")
        if not self.held or not bool((route > 0).any()):
            return result
        dt = self.a_stack.dtype
        rows = x.reshape(x.shape[0], -1, self.in_features).to(dt)  # (b, t, in)
        a, b = self.a_stack[route], self.b_stack[route]  # (b, R, in), (b, out, R): the gathered factors
        lora = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))  # (b, t, out)
        # float32 scale, rounded once to dt: what a LoRA layer's python-float scale does
        h = (lora * self.scale[route].view(-1, 1, 1)).to(dt)
        if self.dora:  # as DoRALinear in eval: (g - 1)·W0x + g·s·BAx; g = 1 on LoRA rows leaves h as is
            bias = getattr(self.base_layer, "bias", None)
            y0 = (result if bias is None else result - bias).reshape(h.shape).to(dt)
            g = self.gain[route].unsqueeze(1)  # (b, 1, out) float32
            h = (g - 1).to(dt) * y0 + g.to(dt) * h
        return result + h.reshape(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, max_rank={self.a_stack.shape[1]}, dtype={self.a_stack.dtype}"
