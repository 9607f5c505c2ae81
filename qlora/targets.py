"""Which linear layers get adapters: presets, names/suffixes, regexes, per-module overrides.

Matching follows PEFT so that configs mean the same thing in both:

- a list entry matches a module whose qualified name equals it or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a regex string must match the whole qualified name (``re.fullmatch``);
- a ``rank_pattern``/``alpha_pattern`` key ``k`` matches a module name ``n``
  when ``re.match(rf"(.*\\.)?({k})$", n)`` does, and the first matching key
  in the dict's order wins (PEFT's ``get_pattern_key``).

Presets name the projections of Llama, Mistral, Qwen2 and Gemma
(``q_proj``...``down_proj``) and of Phi-3, which fuses them into ``qkv_proj``
and ``gate_up_proj``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from torch import nn

from quant.errors import InputError, choices
from quant.linear import NF4Linear

from .lora import LoRALinear

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PRESETS: dict[str, tuple[str, ...] | None] = {
    "all-linear": None,  # every linear layer except the output head
    "attention": ATTENTION,
    "qv": ("q_proj", "v_proj"),
    "mlp": MLP,
}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer for every adaptable linear layer, in module order.

    Adaptable means ``nn.Linear``, ``NF4Linear`` or an existing ``LoRALinear``
    (listed under its own name; its ``base_layer`` is not listed separately).
    """
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(mod, LoRALinear):
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
    return m.base_layer if isinstance(m, LoRALinear) else None


def matches_name(entry: str, name: str) -> bool:
    """PEFT's list semantics: exact qualified name or a ``.``-separated suffix."""
    return name == entry or name.endswith("." + entry)


def _describe(names: Sequence[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]})" if names else ""
    return f"the model's linear layers are named {choices(leaves)}{example}, {len(names)} in all"


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the linear layers selected by ``targets``, in module order.

    Args:
        model: any module, typically a transformers causal LM (16-bit or NF4).
        targets: a preset (``'all-linear'``, ``'attention'``, ``'qv'``,
            ``'mlp'``), a list of names/suffixes, or a regex string matched
            against whole qualified names. A single plain name without regex
            characters (``'q_proj'``) is treated as a one-entry list.

    Raises:
        InputError: a preset, list entry or regex that matches no linear
            layer; the message lists the layer names the model has.
    """
    layers = linear_layers(model)
    names = list(layers)
    head = output_head_names(model)
    if not names:
        raise InputError(f"The model ({type(model).__name__}) has no nn.Linear or NF4Linear layers to adapt.")
    if isinstance(targets, str) and targets in PRESETS:
        return _preset(targets, names, head)
    if isinstance(targets, str) and re.escape(targets) != targets:
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise InputError(f"LoRA targets {targets!r} is not a valid regular expression ({e}).") from None
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise InputError(
                f"LoRA target regex {targets!r} matches no linear layer (it must match the whole qualified "
                f"name); {_describe(names)}. Presets: {choices(PRESETS)}."
            )
        return found
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise InputError(f"LoRA targets must be a preset ({choices(PRESETS)}), a regex or a list of names; got {targets!r}.")
    for e in entries:
        if not any(matches_name(e, n) for n in names):
            raise InputError(
                f"Unknown LoRA target {e!r}: no linear layer has that name or suffix; {_describe(names)}. "
                f"Presets: {choices(PRESETS)}."
            )
    return [n for n in names if any(matches_name(e, n) for e in entries)]


def _preset(preset: str, names: list[str], head: set[str]) -> list[str]:
    suffixes = PRESETS[preset]
    if suffixes is None:
        found = [n for n in names if n not in head]
    else:
        found = [n for n in names if n not in head and any(matches_name(s, n) for s in suffixes)]
        if preset == "qv" and not found:
            # Phi-3 style models fuse q, k and v into one matrix: adapting it also adapts k.
            found = [n for n in names if matches_name("qkv_proj", n)]
            if found:
                log.warning("target preset 'qv': this model fuses q/k/v into qkv_proj; adapting qkv_proj (k included)")
    if not found:
        raise InputError(f"LoRA target preset {preset!r} matches no linear layer of this model; {_describe(names)}.")
    return found


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
            raise InputError(f"{what} key {key!r} matches none of the adapted modules; {_describe(list(names))}.")


def suffix_targets(adapted: Sequence[str], all_names: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``adapted``.

    Leaf names (``q_proj``) when they select exactly the adapted set among
    ``all_names``; otherwise the full qualified names.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n in all_names if any(matches_name(leaf, n) for leaf in leaves)}
    return leaves if chosen == set(adapted) else sorted(adapted)
