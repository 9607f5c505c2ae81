"""VeRA on a model: one shared pair of frozen random matrices, ``VeRALinear`` around each target.

The shared :class:`layers.vera.VeRAProjections` is registered once on the model, as the submodule
``vera_projections`` (non-persistent buffers: ``model.to()`` moves them, ``state_dict`` leaves them
out), and every ``VeRALinear`` holds a reference to it. Everything is found by type, as for LoRA.
The math and its costs are in :mod:`layers.vera`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from layers.base import module_device
from layers.vera import D_INITIAL, VeRALinear, VeRAProjections
from qlora.lora.surgery import LoRAReport, adapter_dtype, freeze_model, lora_modules, lora_report, replace_module
from qlora.lora.targets import resolve_targets
from quant.errors import InputError

log = logging.getLogger(__name__)

PROJECTIONS_NAME = "vera_projections"


def vera_projections(model: nn.Module) -> VeRAProjections | None:
    """The model's shared VeRA matrices (found by type), or None.

    Raises:
        InputError: the model holds more than one set (qlora runs one VeRA adapter per model).
    """
    found = [m for m in model.modules() if isinstance(m, VeRAProjections)]
    if len(found) > 1:
        raise InputError(f"The model holds {len(found)} sets of VeRA matrices; qlora runs one VeRA adapter per model.")
    return found[0] if found else None


def plan_vera(model: nn.Module, targets: str | Sequence[str], rank: int) -> tuple[list[str], int, int]:
    """``(target names, max_in, max_out)``: what the shared matrices must cover. Reads structure only (meta is fine).

    Raises:
        InputError: targets matching nothing, a rank that is not a positive integer, or a model with adapters.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InputError(f"VeRA rank must be a positive integer, got {rank!r}.")
    existing = next((n for n, _ in lora_modules(model)), None)
    if existing is not None:
        raise InputError(f"The model already has adapter layers ({existing!r}, ...); VeRA is applied once per model.")
    names = resolve_targets(model, targets)
    shapes = [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names]
    return names, max(i for i, _ in shapes), max(o for _, o in shapes)


def attach_projections(model: nn.Module, projections: VeRAProjections) -> None:
    """Register ``projections`` on ``model`` as ``vera_projections`` (once; it must hold none yet).

    Raises:
        InputError: the model holds VeRA matrices already.
    """
    if vera_projections(model) is not None:
        raise InputError("The model holds VeRA matrices already; VeRA is applied once per model.")
    model.add_module(PROJECTIONS_NAME, projections)


def wrap_vera(model: nn.Module, names: Sequence[str], d_initial: float = D_INITIAL, dropout: float = 0.0) -> None:
    """Wrap each named linear in a ``VeRALinear`` on the model's (attached) shared matrices, in order.

    Raises:
        InputError: no matrices attached (:func:`attach_projections`), or a layer they do not cover.
    """
    proj = vera_projections(model)
    if proj is None:
        raise InputError("The model has no VeRA matrices; attach_projections comes before wrap_vera.")
    for name in names:
        replace_module(model, name, VeRALinear(model.get_submodule(name), proj, d_initial, dropout))


def apply_vera(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    rank: int = 256,
    d_initial: float = D_INITIAL,
    projection_prng_key: int = 0,
    dropout: float = 0.0,
    dtype: torch.dtype | str = torch.bfloat16,
) -> LoRAReport:
    """Freeze ``model`` and put VeRA on the target linears, in place (PEFT's ``VeraConfig`` semantics).

    Args:
        targets: as :func:`qlora.lora.apply_lora`.
        rank: r of the shared matrices (PEFT's default is 256: VeRA needs a larger r than LoRA for the
            same quality, and pays only ``r`` trainable numbers per layer for it).
        d_initial: the start of every ``d``; ``b`` starts at zero.
        projection_prng_key: the seed of the shared matrices; the same key draws PEFT's matrices.
        dropout: dropout on the adapter input.
        dtype: the shared matrices' dtype and the adapter path's compute dtype; the vectors are float32.

    Returns:
        The model's :class:`qlora.lora.surgery.LoRAReport`.

    Raises:
        InputError: see :func:`plan_vera` and :class:`layers.vera.VeRALinear`.
    """
    dtype = adapter_dtype(dtype)
    names, max_in, max_out = plan_vera(model, targets, rank)
    was = freeze_model(model)
    device = module_device(model.get_submodule(names[0]))
    attach_projections(model, VeRAProjections.seeded(rank, max_in, max_out, projection_prng_key, dtype, device))
    wrap_vera(model, names, d_initial, dropout)
    return log_vera(model, targets, rank, d_initial, projection_prng_key, dtype, was)


def log_vera(model: nn.Module, targets, rank: int, d_initial: float, key: int, dtype: torch.dtype,
             frozen: int) -> LoRAReport:
    """The one log line of a finished :func:`apply_vera` (or a loader's, unit by unit); the model's report."""
    report = lora_report(model)
    proj = vera_projections(model)
    log.info(
        "VeRA on %d modules (targets=%r, r=%d, d_initial=%g, projection_prng_key=%d); shared frozen matrices "
        "(%d, %d) and (%d, %d) in %s (the adapter path computes in it), vectors float32; froze %d previously "
        "trainable base parameters; %s",
        len(report.modules), targets, rank, d_initial, key, rank, proj.max_in, proj.max_out, rank, dtype, frozen,
        report.format(per_module=False),
    )
    return report
