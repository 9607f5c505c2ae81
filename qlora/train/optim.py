"""Optimizers (bitsandbytes) and learning-rate schedules for the adapters."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from quant.errors import InputError, choices

log = logging.getLogger(__name__)
# bitsandbytes warns on every CPU step that paging falls back to plain tensors;
# build_optimizer logs that fact once instead.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(
    param_groups: list[dict],
    name: str = "paged_adamw_8bit",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the adapter parameter groups.

    ``paged_*`` keep state for tensors of >= 1e5 elements in CUDA unified
    memory, which can spill to host RAM under pressure (bitsandbytes); on CPU
    they are ordinary tensors. ``*_8bit`` store both Adam moments blockwise in
    8 bits (~2 bytes/param instead of 8 for fp32 state). ``adamw`` is
    ``torch.optim.AdamW`` (state in the parameter dtype).

    Args:
        param_groups: ``[{"params": [...], "lr": ...}, ...]`` (LoRA+ gives two groups).

    Raises:
        InputError: unknown optimizer name.
    """
    if name not in OPTIMIZERS:
        raise InputError(f"Unknown optimizer {name!r}; valid choices are {choices(OPTIMIZERS)}.")
    kw = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, **kw)
    from quant.blockwise import import_bitsandbytes

    bnb_optim = import_bitsandbytes().optim

    cls = {
        "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb_optim.PagedAdamW32bit,
        "adamw_8bit": bnb_optim.AdamW8bit,
    }[name]
    opt = cls(param_groups, **kw)
    if name.startswith("paged") and not any(p.is_cuda for g in param_groups for p in g["params"]):
        log.info("optimizer %s on CPU: no unified memory, state is held as ordinary host tensors", name)
    return opt


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based), with linear warmup.

    After warmup this is exactly transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
    / ``get_linear_schedule_with_warmup`` (tests/qlora/test_optim.py checks it
    against them). It is kept rather than imported for two reasons: warmup
    starts at ``1/warmup_steps`` instead of 0 (transformers' first step has
    lr 0 and trains nothing), and the linear schedule takes a floor too.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise InputError(f"Unknown schedule {schedule!r}; valid choices are {choices(SCHEDULES)}.")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_lambda`; its state_dict is the step count, so resume is exact."""
    if schedule not in SCHEDULES:
        raise InputError(f"Unknown schedule {schedule!r}; valid choices are {choices(SCHEDULES)}.")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup_steps, schedule, min_lr_ratio)
    )
