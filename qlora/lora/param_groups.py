"""Optimizer parameter groups for LoRA, including LoRA+ (Hayou et al., 2024).

LoRA+ gives B a learning rate ``ratio`` times A's (the paper suggests about
16): with B starting at zero and A random, equal rates make B learn too
slowly for wide layers. DoRA magnitude vectors go with B's rate, as PEFT's
``create_loraplus_optimizer`` does, and never get weight decay: decaying m
would shrink each row's norm toward zero, which is not a regularizer of the
update. VeRA's vectors ``b`` and ``d`` take the base rate and the decay; AdaLoRA's E the base rate, no
decay.
"""

from __future__ import annotations

import logging

from torch import nn

from qlora.lora.surgery import named_lora_parameters
from quant.errors import InputError

log = logging.getLogger(__name__)


def lora_param_groups(
    model: nn.Module, lr: float, loraplus_ratio: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Parameter groups over the trainable adapter parameters (found by type).

    Args:
        lr: learning rate of A (and of everything when ``loraplus_ratio`` is None).
        loraplus_ratio: LoRA+ ratio; B and DoRA magnitudes get ``lr * ratio``.
        weight_decay: applied to A and B, never to DoRA magnitudes.

    Returns:
        A list of ``{'params', 'lr', 'weight_decay', 'name'}`` dicts for any
        torch optimizer (empty groups are left out).

    Raises:
        InputError: lr or ratio not positive, or no trainable adapter parameters.
    """
    if not lr > 0:
        raise InputError(f"Learning rate must be positive, got {lr!r}.")
    if loraplus_ratio is not None and not loraplus_ratio > 0:
        raise InputError(f"loraplus_ratio must be positive (the paper suggests 16), got {loraplus_ratio!r}.")
    params = named_lora_parameters(model, trainable_only=True)
    if not params:
        raise InputError("The model has no trainable LoRA parameters; call qlora.apply_lora first.")
    lr_b = lr * (loraplus_ratio or 1.0)
    groups = {
        "lora_A": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "lora_B": {"params": [], "lr": lr_b, "weight_decay": weight_decay},
        "lora_magnitude_vector": {"params": [], "lr": lr_b, "weight_decay": 0.0},
        # VeRA's vectors are the update's only trainable numbers (b starts at zero like LoRA's B): both take
        # the base rate and the weight decay; LoRA+ has no B-like factor to speed up in VeRA
        "vera_lambda_b": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "vera_lambda_d": {"params": [], "lr": lr, "weight_decay": weight_decay},
        # AdaLoRA's singular values: the base rate, and no decay (it would pull every triplet toward pruned)
        "lora_E": {"params": [], "lr": lr, "weight_decay": 0.0},
    }
    for _, kind, p in params:
        groups[kind]["params"].append(p)
    out = [dict(g, name=k) for k, g in groups.items() if g["params"]]
    log.info(
        "optimizer groups: %s (LoRA+ ratio %s)",
        ", ".join(f"{g['name']}: {len(g['params'])} tensors lr={g['lr']:g} wd={g['weight_decay']:g}" for g in out),
        loraplus_ratio,
    )
    return out


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ groups: :func:`lora_param_groups` with B (and DoRA magnitudes) at ``ratio * lr``.

    Raises:
        InputError: see :func:`lora_param_groups`.
    """
    return lora_param_groups(model, lr, ratio, weight_decay)
