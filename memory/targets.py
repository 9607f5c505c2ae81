"""Which linear layers get LoRA adapters: the one set of selection rules, over qualified names.

Both sides use :func:`select_names`: ``qlora.lora.targets`` on a live module's
linear layers, and :func:`resolve_targets` here on a spec's (``memory`` sits
below ``qlora`` and cannot import it, so the rules live here). Matching
follows PEFT, so a config means the same thing in both:

- a list entry matches a name equal to it or ending in ``"." + entry``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a regex string must match the whole qualified name (``re.fullmatch``);
- presets name the projections of Llama, Mistral, Qwen2 and Gemma
  (``q_proj``...``down_proj``) and of Phi-3, which fuses them into
  ``qkv_proj`` and ``gate_up_proj``; presets never select the output head.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence

from quant.errors import InputError, choices

from .spec import ModelSpec

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PRESETS: dict[str, tuple[str, ...] | None] = {
    "all-linear": None,  # every linear layer except the output head
    "attention": ATTENTION,
    "qv": ("q_proj", "v_proj"),
    "mlp": MLP,
}


def matches_name(entry: str, name: str) -> bool:
    """PEFT's list semantics: exact qualified name or a ``.``-separated suffix."""
    return name == entry or name.endswith("." + entry)


def describe_names(names: Sequence[str]) -> str:
    """One clause naming the leaf names of ``names`` (for error messages)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]})" if names else ""
    return f"the model's linear layers are named {choices(leaves)}{example}, {len(names)} in all"


def select_names(names: Sequence[str], targets: str | Sequence[str], head: Collection[str] = (),
                 label: str = "this model", warn: bool = True) -> list[str]:
    """The qualified names among ``names`` that ``targets`` selects, in the given order.

    Args:
        names: qualified names of the adaptable linear layers.
        targets: a preset (``all-linear``, ``attention``, ``qv``, ``mlp``), a
            list of names/suffixes, or a regex string matched against whole
            qualified names. A single plain name without regex characters
            (``'q_proj'``) is a one-entry list.
        head: names of the output head, which presets never select.
        label: how error messages name the model.
        warn: log the one non-obvious choice (``qv`` on fused q/k/v); the
            planner, which resolves targets for every candidate it tries, passes False.

    Raises:
        InputError: a preset, list entry or regex that selects nothing; the
            message names the layers there are.
    """
    if isinstance(targets, str) and targets in PRESETS:
        suffixes = PRESETS[targets]
        found = [n for n in names if n not in head and (suffixes is None or any(matches_name(s, n) for s in suffixes))]
        if targets == "qv" and not found:
            # Phi-3 style models fuse q, k and v into one matrix: adapting it also adapts k.
            found = [n for n in names if matches_name("qkv_proj", n)]
            if found and warn:
                log.warning("target preset 'qv': this model fuses q/k/v into qkv_proj; adapting qkv_proj (k included)")
        if not found:
            raise InputError(
                f"LoRA target preset {targets!r} matches no linear layer of {label}; {describe_names(names)}."
            )
        return found
    if isinstance(targets, str) and re.escape(targets) != targets:
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise InputError(f"LoRA targets {targets!r} is not a valid regular expression ({e}).") from None
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise InputError(
                f"LoRA target regex {targets!r} matches no linear layer of {label} (it must match the whole qualified "
                f"name); {describe_names(names)}. Presets: {choices(PRESETS)}."
            )
        return found
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise InputError(
            f"LoRA targets must be a preset ({choices(PRESETS)}), a regex or a list of names; got {targets!r}."
        )
    for e in entries:
        if not any(matches_name(e, n) for n in names):
            raise InputError(
                f"Unknown LoRA target {e!r}: no linear layer of {label} has that name or suffix; "
                f"{describe_names(names)}. Presets: {choices(PRESETS)}."
            )
    return [n for n in names if any(matches_name(e, n) for e in entries)]


def resolve_targets(spec: ModelSpec, targets: str | Sequence[str] = "all-linear") -> tuple[str, ...]:
    """In-layer names (``self_attn.q_proj``...) of the linears ``targets`` selects in ``spec``.

    Args:
        targets: as :func:`select_names`.

    Raises:
        InputError: targets that select nothing (:func:`select_names`), or a
            selection outside the decoder layers or in only some of them (the
            planner models identical layers).
    """
    candidates = [lin for lin in spec.linears if lin.quantized]  # the output head is never quantized
    chosen = select_names([lin.name for lin in candidates], targets, label=spec.name, warn=False)
    by_name = {lin.name: lin for lin in candidates}
    shorts: dict[str, None] = {}
    for n in chosen:
        lin = by_name[n]
        if lin.layer is None:
            raise InputError(f"LoRA target {n!r} is outside the decoder layers; the planner models layer linears only.")
        shorts.setdefault(lin.short, None)
    # every layer must carry the same set (the planner's per-layer profile assumes identical layers)
    expected = {lin.name for lin in candidates if lin.short in shorts}
    if expected != set(chosen):
        raise InputError(
            f"LoRA targets {targets!r} adapt only some decoder layers of {spec.name}; the planner needs the same "
            "modules adapted in every layer (use a preset or module names, not a layer-specific regex)."
        )
    return tuple(shorts)


def narrowest_target(spec: ModelSpec, shorts: Collection[str]) -> tuple[str, int]:
    """``(name, min(in, out))`` of the narrowest of the in-layer linears ``shorts`` (resolved targets, as
    :func:`resolve_targets` gives them): a LoRA product ``B @ A`` there cannot have rank above that."""
    return min(((lin.short, min(lin.in_features, lin.out_features)) for lin in spec.layer_linears(0)
                if lin.short in shorts), key=lambda x: x[1])
