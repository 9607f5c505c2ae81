"""Batches whose rows run different loaded adapters: :func:`route_adapters` and its :class:`AdapterRouter`.

Inside ``with route_adapters(model) as router:`` every adapted position of the model is a
:class:`layers.routed.RoutedLinear` holding a copy of each routed adapter's factors there (a zero slot
where an adapter does not target that position), and ``router.set_rows(names)`` says which adapter each
row of the next batch takes (None: the base alone). On exit, errors included, the positions get back
the layers they had on entry; those layers are never modified, so nothing else the bank holds changes.

Cost: one copy of the routed adapters' factors, padded per position to the largest rank there, held
for the duration of the block; DoRA adapters also compute their ``m/‖W‖`` once per layer on entry (one
dense float32 base weight at a time). Inference only: the routed layers take no gradient.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from layers.routed import RoutedLinear
from qlora.adapters.multi import adapter_layers, adapter_names
from qlora.lora.surgery import lora_modules, replace_module
from quant.errors import InputError, choices

log = logging.getLogger(__name__)


class AdapterRouter:
    """Names each row's adapter for the routed layers of one :func:`route_adapters` block.

    Attributes:
        names: the routed adapters, in slot order (slot ``i + 1`` is ``names[i]``; slot 0 is the base alone).
    """

    def __init__(self, names: Sequence[str], layers: Sequence[RoutedLinear]):
        self.names = list(names)
        self._slot = {n: i + 1 for i, n in enumerate(self.names)}
        self._layers = list(layers)

    def slots(self, rows: Sequence[str | None]) -> torch.Tensor:
        """int64 ``(len(rows),)``: each row's slot (0 for None).

        Raises:
            InputError: a name that is not routed here (the routed names are listed), or no rows.
        """
        if len(rows) == 0:
            raise InputError("set_rows needs one adapter name (or None) per row of the batch; got none.")
        bad = next((r for r in rows if r is not None and r not in self._slot), None)
        if bad is not None:
            raise InputError(f"No routed adapter named {bad!r}; routed adapters: {choices(self.names)}, "
                             "or None for the base alone.")
        return torch.tensor([0 if r is None else self._slot[r] for r in rows], dtype=torch.int64)

    def set_rows(self, rows: Sequence[str | None]) -> None:
        """The adapter of each row of the next batches (``(batch,)`` names; None: the base alone).

        Raises:
            InputError: see :meth:`slots`.
        """
        route = self.slots(rows)
        for layer in self._layers:
            layer.set_route(route)


@contextlib.contextmanager
def route_adapters(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[AdapterRouter]:
    """Serve several loaded adapters in one batch inside the ``with`` block; yields the :class:`AdapterRouter`.

    Args:
        model: a model with adapters loaded by :func:`qlora.adapters.multi.add_adapter` (or one applied
            or loaded adapter, which counts as ``'default'``).
        names: the adapters to route, in slot order; default: every loaded adapter.

    Raises:
        InputError: no adapters loaded, an unknown or repeated name (the loaded ones are listed),
            adapters merged into the base, or an adapter kind a routed layer does not take
            (see :class:`layers.routed.RoutedLinear`).
    """
    loaded = adapter_names(model)
    if not loaded:
        raise InputError("route_adapters serves the adapters loaded on a model (qlora.adapters.add_adapter), "
                         "and this model has none.")
    names = list(loaded if names is None else names)
    if len(set(names)) != len(names) or not names:
        raise InputError(f"route_adapters takes each adapter once and at least one; got {names}.")
    positions = list(lora_modules(model))
    if any(m.merged for _, m in positions):
        raise InputError("Cannot route adapters while adapters are merged into the base; call qlora.unmerge first.")
    per_adapter = [adapter_layers(model, n) for n in names]  # raises on an unknown name
    for layers in per_adapter:
        for layer in layers.values():
            layer.follow_base_device()  # banked layers stay where they were loaded; the stacks go to the base
    routed = {pos: RoutedLinear(m.base_layer, [layers.get(pos) for layers in per_adapter]) for pos, m in positions}
    log.info("routing %d adapters (%s) through %d layers", len(names), ", ".join(names), len(routed))
    try:
        for pos, layer in routed.items():
            replace_module(model, pos, layer)
        yield AdapterRouter(names, list(routed.values()))
    finally:
        for pos, m in positions:
            replace_module(model, pos, m)
