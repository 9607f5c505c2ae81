"""Which linear layers get adapters: presets, names/suffixes, regexes, per-module overrides.

The selection rules (presets, PEFT's name/suffix and regex semantics) live
in :mod:`memory.targets`, shared with the planner so that both always pick
the same layers; this module applies them to a live model's linear layers
(by type: ``nn.Linear``, ``NF4Linear``, an adapter layer). Per-module
overrides follow PEFT too:

- a ``rank_pattern``/``alpha_pattern`` key ``k`` matches a module name ``n``
  when ``re.match(rf"(.*\\.)?({k})$", n)`` does, and the first matching key
  in the dict's order wins (PEFT's ``get_pattern_key``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from layers.base import AdapterLinear
from memory.targets import describe_names, matches_name, select_names
from quant.errors import InputError
from quant.linear import NF4Linear


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer for every adaptable linear layer, in module order.

    Adaptable means ``nn.Linear``, ``NF4Linear`` or an existing adapter layer
    (``LoRALinear``/``DoRALinear``, listed under its own name; its
    ``base_layer`` is not listed separately).
    """
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(mod, AdapterLinear):
            out[name] = mod
            inside.append(name + ".")
        elif isinstance(mod, (nn.Linear, NF4Linear)):
            out[name] = mod
    return out


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (``get_output_embeddings()``), which presets never adapt."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and (m is head or _base_of(m) is head)}
    return names or ({"lm_head"} & set(linear_layers(model)))


def _base_of(m: nn.Module) -> nn.Module | None:
    return m.base_layer if isinstance(m, AdapterLinear) else None


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the linear layers selected by ``targets``, in module order.

    Args:
        model: any module, typically a transformers causal LM (16-bit or NF4).
        targets: a preset (``'all-linear'``, ``'attention'``, ``'qv'``,
            ``'mlp'``), a list of names/suffixes, or a regex string matched
            against whole qualified names (rules: :func:`memory.targets.select_names`,
            the same ones the planner applies to a model spec).

    Raises:
        InputError: a preset, list entry or regex that matches no linear
            layer; the message lists the layer names the model has.
    """
    names = list(linear_layers(model))
    if not names:
        raise InputError(f"The model ({type(model).__name__}) has no nn.Linear or NF4Linear layers to adapt.")
    return select_names(names, targets, output_head_names(model))


def pattern_key(patterns: Mapping[str, object], name: str) -> str | None:
    """The first key of ``patterns`` matching module ``name`` with PEFT's rule, or None.

    Raises:
        InputError: a key is not a valid regular expression.
    """
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise InputError(f"rank/alpha pattern key {key!r} is not a valid regular expression ({e}).") from None
    return None


def pattern_value(patterns: Mapping[str, object] | None, name: str, default):
    """``patterns[key]`` for the first key matching ``name`` (see :func:`pattern_key`), else ``default``."""
    if not patterns:
        return default
    key = pattern_key(patterns, name)
    return default if key is None else patterns[key]


def check_patterns(patterns: Mapping[str, object] | None, names: Sequence[str], what: str) -> None:
    """Refuse override keys that match none of the adapted modules (almost always a typo).

    Raises:
        InputError: naming the unused key and the adapted module names.
    """
    for key in patterns or {}:
        if not any(pattern_key({key: None}, n) for n in names):
            raise InputError(f"{what} key {key!r} matches none of the adapted modules; {describe_names(list(names))}.")


def suffix_targets(adapted: Sequence[str], all_names: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``adapted``.

    Leaf names (``q_proj``) when they select exactly the adapted set among
    ``all_names``; otherwise the full qualified names.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n in all_names if any(matches_name(leaf, n) for leaf in leaves)}
    return leaves if chosen == set(adapted) else sorted(adapted)
