"""Which linears of a spec get LoRA adapters, by the same rules as ``qlora.targets``.

``memory`` cannot import ``qlora``, so the preset table and matching rules
are repeated here over a spec's qualified linear names (PEFT semantics: a
list entry matches a name equal to it or ending in ``"." + entry``; a regex
must match the whole qualified name). ``tests/memory/test_targets.py``
checks that both resolve every preset identically on real models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from quant.errors import InputError, choices

from .spec import ModelSpec

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PRESETS: dict[str, tuple[str, ...] | None] = {
    "all-linear": None,
    "attention": ATTENTION,
    "qv": ("q_proj", "v_proj"),
    "mlp": MLP,
}


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _leaves(names: Sequence[str]) -> str:
    return choices(sorted({n.rsplit(".", 1)[-1] for n in names}))


def resolve_targets(spec: ModelSpec, targets: str | Sequence[str] = "all-linear") -> tuple[str, ...]:
    """In-layer names (``self_attn.q_proj``...) of the linears ``targets`` selects.

    Args:
        targets: a preset (``all-linear``, ``attention``, ``qv``, ``mlp``), a
            list of names/suffixes, or a regex over qualified names. The
            output head is never a preset target.

    Raises:
        InputError: a preset/name/regex that selects no linear of this model,
            or a selection outside the decoder layers (the planner models
            adapters on layer linears only).
    """
    candidates = [lin for lin in spec.linears if lin.quantized]
    names = [lin.name for lin in candidates]
    if isinstance(targets, str) and targets in PRESETS:
        suffixes = PRESETS[targets]
        chosen = names if suffixes is None else [n for n in names if any(_matches(s, n) for s in suffixes)]
        if targets == "qv" and not chosen:  # Phi-3 fuses q/k/v: qlora adapts qkv_proj (k included)
            chosen = [n for n in names if _matches("qkv_proj", n)]
    elif isinstance(targets, str) and re.escape(targets) != targets:
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise InputError(f"LoRA targets {targets!r} is not a valid regular expression ({e}).") from None
        chosen = [n for n in names if rx.fullmatch(n)]
    else:
        entries = [targets] if isinstance(targets, str) else list(targets)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise InputError(
                f"LoRA targets must be a preset ({choices(PRESETS)}), a regex or a list of names; got {targets!r}."
            )
        for e in entries:
            if not any(_matches(e, n) for n in names):
                raise InputError(
                    f"Unknown LoRA target {e!r} for {spec.name}: its linear layers are named {_leaves(names)}. "
                    f"Presets: {choices(PRESETS)}."
                )
        chosen = [n for n in names if any(_matches(e, n) for e in entries)]
    if not chosen:
        raise InputError(
            f"LoRA targets {targets!r} select no linear layer of {spec.name}; its linear layers are named "
            f"{_leaves(names)}. Presets: {choices(PRESETS)}."
        )
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
