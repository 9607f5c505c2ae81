"""``adapter_config.json``, PEFT's half of an adapter folder: the config qlora writes and the configs it refuses.

qlora writes PEFT 0.21's field names (``r``, ``lora_alpha``, ``rank_pattern``,
``alpha_pattern``, ``use_rslora``, ``use_dora``, ``target_modules``...) and no
others: PEFT builds its ``LoraConfig`` from every key and warns about unknown
ones. Reading, it refuses the options that would make qlora compute something
other than PEFT does, naming the option. The weights half is
:mod:`qlora.adapters.files`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.lora.targets import pattern_value, suffix_targets
from quant.errors import InputError

if TYPE_CHECKING:
    from qlora.adapters.files import Adapter

log = logging.getLogger(__name__)

# Config options that change the math or touch more than LoRA-on-linear; we refuse them instead of
# loading something that would compute different outputs than PEFT.
_UNSUPPORTED_TRUTHY = (
    "fan_in_fan_out", "lora_bias", "modules_to_save", "target_parameters", "trainable_token_indices",
    "layer_replication", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def most_common(values):
    """The most frequent of ``values`` (the first seen among equals)."""
    return Counter(values).most_common(1)[0][0]


def adapter_config(adapter: Adapter, all_linear_names: list[str] | None = None) -> dict:
    """The ``adapter_config.json`` dict for ``adapter`` (PEFT 0.21 field names).

    ``r``/``lora_alpha`` are the most common values; other modules go into
    ``rank_pattern``/``alpha_pattern`` under their full names (regex-escaped
    only where a plain name would also match another module).

    Raises:
        InputError: DoRA or rsLoRA on only some modules (one flag per file in PEFT).
    """
    mods = adapter.modules
    for flag, vals in (("use_dora", [m.magnitude is not None for m in mods.values()]),
                       ("use_rslora", [m.use_rslora for m in mods.values()])):
        if len(set(vals)) > 1:
            raise InputError(
                f"Cannot save an adapter with {flag} on some modules only; PEFT files have one {flag} flag."
            )
    names = list(mods)
    r = most_common([m.rank for m in mods.values()])
    alpha = most_common([m.alpha for m in mods.values()])
    rank_pattern = _patterns({n: m.rank for n, m in mods.items()}, r)
    alpha_pattern = _patterns({n: m.alpha for n, m in mods.items()}, alpha)
    targets = suffix_targets(names, all_linear_names or names)
    first = next(iter(mods.values()))
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": adapter.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": first.magnitude is not None,
        "use_rslora": first.use_rslora,
    }


def _patterns(values: dict[str, float], default) -> dict:
    """Per-module overrides keyed by full module name; checked to resolve back exactly under PEFT's rule."""
    pattern = {n: v for n, v in values.items() if v != default}
    if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
        return pattern
    return {re.escape(n): v for n, v in pattern.items()}


def check_config(cfg: dict, path: Path) -> None:
    """Refuse a config qlora cannot run as PEFT would.

    Raises:
        InputError: not ``peft_type`` LORA, no numeric ``r``/``lora_alpha``, trained biases, an unsupported
            option (named), or an init that changed the base weights.
    """
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"{path} has peft_type {peft_type!r}; qlora reads LoRA adapters (peft_type 'LORA', "
            "including DoRA and rsLoRA ones), VeRA adapters (peft_type 'VERA') and AdaLoRA adapters "
            "(peft_type 'ADALORA')."
        )
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        log.warning("%s has task_type %r; loading its LoRA weights onto a causal LM anyway", path, task)
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise InputError(f"{path} lacks a numeric {key!r} field, got {cfg.get(key)!r}.")
    if cfg.get("bias", "none") != "none":
        raise InputError(
            f"{path} has bias={cfg['bias']!r}; qlora supports bias='none' only (trained biases are not LoRA)."
        )
    for key in _UNSUPPORTED_TRUTHY:
        if cfg.get(key):
            raise InputError(
                f"{path} sets {key}={cfg[key]!r}, which qlora does not support; valid adapters leave it unset."
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputError(
            f"{path} has init_lora_weights={init!r}, which modifies the base weights; convert it to a plain LoRA "
            "adapter first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
