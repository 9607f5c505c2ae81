"""Several named adapters on one base: switch the active one, combine them, do arithmetic.

An adapter layer holds exactly one adapter. The others wait in a bank on the
model (``model.qlora_adapters``: name -> module name -> adapter layer), each a
whole ``LoRALinear`` or ``DoRALinear`` that wraps the *same* frozen base as
the layer in the model. Switching swaps those layer objects in and out of the
model, so it costs no copies, an optimizer built on the active adapter's
parameters keeps pointing at them, and one adapter can be DoRA where another
is plain LoRA on the same layer. A position the active adapter does not cover
holds a pass-through layer (:meth:`layers.base.AdapterLinear.passthrough`), so
state-dict keys (``<module>.base_layer.*``) never move. Banked layers are
plain attributes: ``model.to()`` does not move them; :func:`set_active_adapter`
moves their tensors to the base's device when putting them back.

Combining is exact by concatenating ranks: for adapters ``i`` with scale
``s_i`` and weight ``w_i``,
``A = [A_1; A_2; ...]`` ``(Σr_i, in)`` and ``B = [w_1·s_1·B_1, w_2·s_2·B_2, ...]``
``(out, Σr_i)`` with scale 1, so ``B·A = Σ w_i·s_i·B_i·A_i``. Negative weights
give task-vector arithmetic (``[1, -1]`` is a difference). DoRA adapters are
not linear in their parameters and cannot be combined this way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from layers.base import AdapterLinear
from layers.lora import LoRALinear
from qlora.adapters.files import Adapter, ModuleAdapter, adapter_layer, check_adapter_fits, module_adapter, read_adapter
from qlora.lora.surgery import adapter_dtype, freeze_model, lora_modules, replace_module
from quant.errors import InputError, choices

log = logging.getLogger(__name__)

BANK = "qlora_adapters"
ACTIVE = "qlora_active_adapter"


def _bank(model: nn.Module) -> dict[str, dict[str, AdapterLinear]]:
    bank = model.__dict__.get(BANK)
    if bank is None:
        bank = {}
        object.__setattr__(model, BANK, bank)  # a plain attribute: not a submodule, not in state_dict
        live = _live(model)
        if live:  # an adapter applied/loaded before the bank existed becomes "default"
            bank["default"] = live
            object.__setattr__(model, ACTIVE, "default")
    return bank


def _live(model: nn.Module) -> dict[str, AdapterLinear]:
    """The adapter layers in the model that hold an adapter: the active adapter, as it is now."""
    return {name: m for name, m in lora_modules(model) if m.has_adapter}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters held by ``model`` (``'default'`` for one applied before any was named)."""
    return list(_bank(model))


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None."""
    _bank(model)
    return model.__dict__.get(ACTIVE)


def add_adapter(
    model: nn.Module,
    name: str,
    adapter: str | os.PathLike | Adapter,
    dtype: torch.dtype | str | None = None,
    trainable: bool = False,
    activate: bool = False,
) -> None:
    """Add a named adapter (a PEFT folder or an :class:`Adapter`) to the bank.

    Layers it covers are wrapped in a pass-through adapter layer if needed
    (until it is active). It becomes active when ``activate`` or when it is
    the first adapter. ``dtype=None`` keeps the file's dtype. Only the new
    adapter is trainable afterwards (when ``trainable``): the base and every
    other adapter are frozen.

    Raises:
        InputError: the name is taken or empty, or the adapter does not fit
            the model (see :func:`qlora.adapters.files.check_adapter_fits`).
    """
    bank = _bank(model)
    if not isinstance(name, str) or not name:
        raise InputError(f"Adapter name must be a non-empty string, got {name!r}.")
    if name in bank:
        raise InputError(f"An adapter named {name!r} is already loaded; loaded adapters: {choices(bank)}.")
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    dtype = None if dtype is None else adapter_dtype(dtype)
    layers = check_adapter_fits(model, adapter)
    if any(m.merged for _, m in lora_modules(model)):
        raise InputError("Cannot add an adapter while adapters are merged; call qlora.unmerge first.")
    freeze_model(model)
    for p in (p for slots in bank.values() for layer in slots.values() for p in layer.parameters()):
        p.requires_grad_(False)  # freeze_model only saw the live ones; banked adapters stay frozen too
    slots = {}
    for mod_name, layer in layers.items():
        if not isinstance(layer, AdapterLinear):  # pass-through until this adapter is activated
            replace_module(model, mod_name, LoRALinear.passthrough(layer))
        slots[mod_name] = adapter_layer(layer, adapter.modules[mod_name], dtype, trainable, adapter.dropout)
    bank[name] = slots
    if activate or model.__dict__.get(ACTIVE) is None:
        set_active_adapter(model, name)
    log.info(
        "added adapter %r (%d modules, trainable=%s); active: %r", name, len(slots), trainable, active_adapter(model)
    )


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter the model runs; modules it does not cover pass through.

    Swaps the banked adapter layers into the model (each in the train/eval
    mode of the layer it replaces, its tensors moved to the base's device);
    no tensor is copied.

    Raises:
        InputError: unknown name (listing the loaded ones), or adapters are merged.
    """
    bank = _bank(model)
    if name not in bank:
        raise InputError(f"No adapter named {name!r}; loaded adapters: {choices(bank) or 'none'}.")
    if any(m.merged for _, m in lora_modules(model)):
        raise InputError("Cannot switch adapters while they are merged; call qlora.unmerge first.")
    current = model.__dict__.get(ACTIVE)
    if current in bank:
        bank[current] = _live(model)  # keep what is live (it may have been replaced or trained)
    slots = bank[name]
    for mod_name, m in list(lora_modules(model)):
        new = slots.get(mod_name)
        if new is None:
            if m.has_adapter:
                new = LoRALinear.passthrough(m.base_layer)
                new.set_enabled(m.enabled)
                replace_module(model, mod_name, new)
            continue
        if new is not m:
            new.follow_base_device()
            new.set_enabled(m.enabled)  # inside disable_adapters(), the switched-in adapter stays off too
            replace_module(model, mod_name, new)
    object.__setattr__(model, ACTIVE, name)
    log.info("active adapter: %r", name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` from the bank (the active one cannot be deleted).

    Raises:
        InputError: unknown name, or it is the active adapter.
    """
    bank = _bank(model)
    if name not in bank:
        raise InputError(f"No adapter named {name!r}; loaded adapters: {choices(bank) or 'none'}.")
    if name == model.__dict__.get(ACTIVE):
        raise InputError(f"Adapter {name!r} is active; activate another one before deleting it.")
    del bank[name]


def adapter_layers(model: nn.Module, name: str) -> dict[str, AdapterLinear]:
    """The layers of loaded adapter ``name``, by module name: the live ones if it is active, else the banked ones.

    Raises:
        InputError: unknown name.
    """
    bank = _bank(model)
    if name not in bank:
        raise InputError(f"No adapter named {name!r}; loaded adapters: {choices(bank) or 'none'}.")
    return _live(model) if name == model.__dict__.get(ACTIVE) else bank[name]


def bank_adapter(model: nn.Module, name: str) -> Adapter:
    """A loaded adapter as an :class:`Adapter` (tensors are references, not copies).

    Raises:
        InputError: unknown name.
    """
    slots = adapter_layers(model, name)
    mods = {n: module_adapter(layer) for n, layer in slots.items()}
    dropout = next((layer.dropout for layer in slots.values() if layer.dropout > 0), 0.0)
    return Adapter(mods, dropout, getattr(getattr(model, "config", None), "_name_or_path", None))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model only inside the ``with`` block (e.g. a reference model for DPO).

    Holds across :func:`set_active_adapter` inside the block; on exit every
    position gets back the setting it had on entry, whichever layer sits there.
    """
    mods = list(lora_modules(model))
    before = {name: m.set_enabled(False) for name, m in mods}
    try:
        yield
    finally:
        for name, m in mods:  # the layers of entry, live or banked by a switch since
            m.set_enabled(before[name])
        for name, m in lora_modules(model):  # and whatever is live now, by position
            m.set_enabled(before.get(name, True))


@torch.no_grad()
def combine_adapters(
    adapters: Sequence[Adapter], weights: Sequence[float], dtype: torch.dtype = torch.float32
) -> Adapter:
    """One adapter equal to ``Σ w_i·s_i·B_i·A_i`` by concatenating ranks (exact).

    Per module the result has rank ``Σ r_i`` over the adapters that cover it,
    ``alpha = rank`` (scale 1, no rsLoRA) and ``B`` columns pre-scaled by
    ``w_i·s_i`` (float32 math, one rounding to ``dtype``; float32 by default
    so the combination stays exact to float32 precision).

    Raises:
        InputError: no adapters, a weight count that differs, or a DoRA adapter.
    """
    if not adapters:
        raise InputError("combine_adapters needs at least one adapter.")
    if len(weights) != len(adapters):
        raise InputError(
            f"combine_adapters got {len(adapters)} adapters but {len(weights)} weights; pass one weight each."
        )
    for i, a in enumerate(adapters):
        if a.use_dora:
            raise InputError(
                f"Adapter #{i} is a DoRA adapter; DoRA is not linear in B·A, so it cannot be combined by weights."
            )
    names: list[str] = []
    for a in adapters:
        names += [n for n in a.modules if n not in names]
    out: dict[str, ModuleAdapter] = {}
    for n in names:
        parts = [(a.modules[n], float(w)) for a, w in zip(adapters, weights) if n in a.modules]
        # a VeRA adapter's A holds the shared width (wide_A); its first `in` columns are the layer's, and
        # any LoRA part, or the narrowest shared width, is at least that wide
        width = min(m.lora_A.shape[1] for m, _ in parts)
        a_cat = torch.cat([m.lora_A[:, :width].float() for m, _ in parts], dim=0)
        b_cat = torch.cat([m.lora_B.float() * (w * m.scale) for m, w in parts], dim=1)
        rank = a_cat.shape[0]
        wide = all(m.wide_A for m, _ in parts)
        out[n] = ModuleAdapter(a_cat.to(dtype), b_cat.to(dtype), float(rank), False, None, wide_A=wide)
    log.info("combined %d adapters with weights %s into one of %d modules", len(adapters), list(weights), len(out))
    return Adapter(out, 0.0, adapters[0].base_model_name_or_path)


def add_weighted_adapter(
    model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str, activate: bool = True
) -> Adapter:
    """Combine loaded adapters ``names`` with ``weights`` into a new loaded adapter ``new_name``.

    Returns the combined :class:`Adapter` (save it with :func:`qlora.write_adapter`,
    or merge it with :func:`qlora.merge_and_unload` once active).

    Raises:
        InputError: unknown names, see :func:`combine_adapters` and :func:`add_adapter`.
    """
    combined = combine_adapters([bank_adapter(model, n) for n in names], weights)
    add_adapter(model, new_name, combined, activate=activate)
    return combined
