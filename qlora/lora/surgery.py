"""Model surgery: put ``LoRALinear`` (or ``DoRALinear``) around chosen linear layers, in place.

There is no wrapper model and no key prefix: ``model.layers.0.self_attn.q_proj``
is still there under that name, now an adapter layer whose ``base_layer`` is
the original layer. Adapter layers and their parameters are always found by
type (:func:`lora_modules`: ``isinstance(m, layers.AdapterLinear)``), never by
matching names, so a user module that happens to be called
``lora_something`` is never mistaken for one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layers.adalora import AdaLoRALinear
from layers.base import INITS, AdapterLinear
from layers.delta import DeltaLoRALinear
from layers.dora import DoRALinear
from layers.lora import LoRALinear
from qlora.lora.targets import check_patterns, pattern_value, resolve_targets
from quant.dtypes import parse_dtype
from quant.errors import InputError, choices
from quant.linear import NF4Linear

log = logging.getLogger(__name__)


def adapter_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Resolve ``'bfloat16'``/``torch.float32``/... to a torch dtype (:func:`quant.dtypes.parse_dtype`).

    Raises:
        InputError: not one of bfloat16, float16, float32.
    """
    return parse_dtype(dtype, what="adapter dtype")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(qualified name, module)`` for every adapter layer (``LoRALinear``, ``DoRALinear``), found by type."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            yield name, mod


def adapter_tensors(module: AdapterLinear) -> list[tuple[str, nn.Parameter]]:
    """``[('lora_A', A), ('lora_B', B), ('lora_magnitude_vector', m)?]`` of one module's adapter."""
    return module.adapter_tensors()


def named_lora_parameters(model: nn.Module, trainable_only: bool = True) -> list[tuple[str, str, nn.Parameter]]:
    """``(module name, 'lora_A'|'lora_B'|'lora_magnitude_vector', parameter)`` in module order."""
    return [
        (name, kind, p)
        for name, mod in lora_modules(model)
        for kind, p in adapter_tensors(mod)
        if p.requires_grad or not trainable_only
    ]


def lora_parameters(model: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    """The adapter parameters (A, B, DoRA magnitudes) of every adapter layer, found by type.

    ``trainable_only`` drops frozen ones (A under LoRA-FA); pass the result to the optimizer.
    """
    return [p for _, _, p in named_lora_parameters(model, trainable_only)]


def logical_parameter_count(model: nn.Module) -> int:
    """Parameters of the model as a user counts them: a 4-bit weight counts ``out*in``.

    ``nn.Parameter`` objects are counted once even when tied; ``NF4Linear``
    stores its weight as packed uint8 buffers, so it contributes
    ``in*out`` (+ bias) instead of its buffer sizes.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
    return total


@dataclass(frozen=True)
class ModuleReport:
    """One adapted module: its shape, rank, scale and adapter parameter count."""

    name: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scale: float
    dora: bool
    params: int  # r·(in + out) (+ out for DoRA)
    trainable: int  # params minus frozen ones (A under LoRA-FA)


@dataclass(frozen=True)
class LoRAReport:
    """Trainable-parameter report: per module and in total, against the whole model."""

    modules: tuple[ModuleReport, ...]
    trainable: int
    adapter_params: int
    model_params: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the whole model (adapters included)."""
        return 100.0 * self.trainable / self.model_params if self.model_params else 0.0

    def format(self, per_module: bool = True) -> str:
        """A plain-text table (for the CLI and logs)."""
        lines = []
        if per_module:
            w = max([len(m.name) for m in self.modules] + [6])
            lines.append(f"{'module':<{w}}  {'in':>6} {'out':>6} {'r':>4} {'alpha':>7} {'trainable':>11}  %model")
            for m in self.modules:
                pct = 100.0 * m.trainable / self.model_params
                lines.append(
                    f"{m.name:<{w}}  {m.in_features:>6} {m.out_features:>6} {m.rank:>4} {m.alpha:>7g} "
                    f"{m.trainable:>11,}  {pct:.4f}{' dora' if m.dora else ''}"
                )
        lines.append(
            f"trainable: {self.trainable:,} of {self.model_params:,} parameters ({self.percent:.4f}%) "
            f"in {len(self.modules)} LoRA modules"
        )
        return "\n".join(lines)


def lora_report(model: nn.Module) -> LoRAReport:
    """Count adapter parameters per module and in total, found by type."""
    mods = []
    for name, m in lora_modules(model):
        tensors = adapter_tensors(m)
        if not tensors:
            continue
        mods.append(
            ModuleReport(
                name=name, in_features=m.in_features, out_features=m.out_features, rank=m.rank,
                alpha=m.alpha, scale=m.scale, dora=isinstance(m, DoRALinear),
                params=sum(p.numel() for _, p in tensors),
                trainable=sum(p.numel() for _, p in tensors if p.requires_grad),
            )
        )
    return LoRAReport(
        modules=tuple(mods),
        trainable=sum(m.trainable for m in mods),
        adapter_params=sum(m.params for m in mods),
        model_params=logical_parameter_count(model),
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at qualified ``name`` to ``new``, in the mode (train/eval) of the one it replaces.

    A fresh module starts in training mode; inserted into a model in eval
    mode it would otherwise apply dropout during inference.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


def freeze_model(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on every parameter; returns how many were trainable before."""
    n = 0
    for p in model.parameters():
        n += int(p.requires_grad)
        p.requires_grad_(False)
    return n


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "kaiming",
    dtype: torch.dtype | str = torch.bfloat16,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    freeze_A: bool = False,
    delta_ratio: float | None = None,
    adalora: bool = False,
) -> LoRAReport:
    """Freeze ``model`` and wrap the target linear layers in ``LoRALinear`` (``DoRALinear``), in place.

    Every existing parameter (embeddings, norms, head, 16-bit linears) is
    frozen; afterwards only adapter parameters are trainable.

    Args:
        model: a transformers causal LM (16-bit or after ``quant.quantize_model``).
        targets: preset, names/suffixes or regex, see :func:`qlora.lora.targets.resolve_targets`.
        rank, alpha: default rank r and alpha; the scale is alpha/r (alpha/sqrt(r) with ``use_rslora``).
        dropout: dropout probability on the adapter input.
        use_rslora: rank-stabilized scale alpha/sqrt(r).
        use_dora: ``DoRALinear`` layers with magnitude vectors (costs a dense base weight per forward,
            see layers.dora).
        init: ``'kaiming'`` (A Kaiming-uniform, PEFT's default) or ``'gaussian'`` (std 1/r); B is zero.
        dtype: adapter dtype, ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32``.
        rank_pattern, alpha_pattern: per-module overrides, PEFT semantics (first matching key wins).
        freeze_A: LoRA-FA, A stays at its random init and only B (and m) train.
        delta_ratio: Delta-LoRA with this λ (``layers.delta.DeltaLoRALinear``: the base follows λ times the
            adapter's change, kept implicit); it takes no dropout and no DoRA.
        adalora: AdaLoRA layers (``layers.adalora.AdaLoRALinear``: SVD form, pruned by
            :class:`qlora.lora.adalora.RankAllocator`); ``rank`` is the starting rank.

    Returns:
        The :class:`LoRAReport` of the adapted model.

    Raises:
        InputError: unknown targets, rank or pattern rank <= 0, alpha <= 0,
            unknown init/dtype, override keys that match no target, or a
            model that already has LoRA modules.
    """
    dtype = adapter_dtype(dtype)
    plan = plan_lora(model, targets, rank, alpha, dropout, init, dtype, rank_pattern, alpha_pattern)
    was = freeze_model(model)
    wrap_targets(model, plan, dropout, use_rslora, use_dora, init, dtype, freeze_A, delta_ratio, adalora)
    return log_lora(model, len(plan), targets, rank, alpha, use_rslora, use_dora, freeze_A, dtype, was)


def log_lora(model: nn.Module, n_modules: int, targets, rank: int, alpha: float, use_rslora: bool, use_dora: bool,
             freeze_A: bool, dtype: torch.dtype, frozen: int) -> LoRAReport:
    """The one log line of a finished :func:`apply_lora` (or a loader's wrapping, unit by unit); its report."""
    report = lora_report(model)
    log.info(
        "LoRA on %d modules (targets=%r, r=%d, alpha=%g, rslora=%s, dora=%s, LoRA-FA=%s); adapter dtype %s "
        "(DoRA magnitudes float32); "
        "froze %d previously trainable base parameters; %s",
        n_modules, targets, rank, alpha, use_rslora, use_dora, freeze_A, dtype, frozen,
        report.format(per_module=False),
    )
    return report


def plan_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    dtype: torch.dtype | str = torch.bfloat16,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> list[tuple[str, int, float]]:
    """Check :func:`apply_lora`'s arguments against ``model`` and list ``(name, rank, alpha)`` per target.

    Reads only the model's structure, so it runs on a model whose parameters are still on the meta
    device: a loader going unit by unit checks everything before any weight is read, then wraps each
    unit's targets with :func:`wrap_targets` as it arrives.

    Raises:
        InputError: see :func:`apply_lora`.
    """
    adapter_dtype(dtype)
    if init not in INITS:
        raise InputError(f"Unknown LoRA init {init!r}; valid choices are {choices(INITS)}.")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    existing = next((n for n, _ in lora_modules(model)), None)
    if existing is not None:
        raise InputError(
            f"The model already has LoRA modules ({existing!r}, ...); apply_lora runs once per model. Use "
            "rank_pattern/alpha_pattern for per-module settings, load_adapter to replace the weights, or "
            "qlora.adapters.multi to hold several adapters."
        )
    names = resolve_targets(model, targets)
    check_patterns(rank_pattern, names, "rank_pattern")
    check_patterns(alpha_pattern, names, "alpha_pattern")
    plan = []
    for name in names:
        r = pattern_value(rank_pattern, name, rank)
        a = pattern_value(alpha_pattern, name, alpha)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise InputError(f"LoRA rank must be a positive integer, got {r!r} for module {name!r}.")
        if not isinstance(a, (int, float)) or not a > 0:
            raise InputError(f"LoRA alpha must be a positive number, got {a!r} for module {name!r}.")
        plan.append((name, r, float(a)))
    return plan


def wrap_targets(
    model: nn.Module,
    plan: Sequence[tuple[str, int, float]],
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "kaiming",
    dtype: torch.dtype | str = torch.bfloat16,
    freeze_A: bool = False,
    delta_ratio: float | None = None,
    adalora: bool = False,
) -> None:
    """Wrap each ``(name, rank, alpha)`` of ``plan`` (:func:`plan_lora`) in a new adapter layer, in order.

    The adapters are built on each base layer's device, so every named layer must be loaded (a DoRA
    magnitude is the base's row norms). Initial values draw from torch's RNG in ``plan`` order: wrapping
    a plan in pieces, in order, gives the same adapters as wrapping it at once when nothing else draws
    in between. ``delta_ratio``: Delta-LoRA layers (:class:`layers.delta.DeltaLoRALinear`); ``adalora``:
    AdaLoRA layers (:class:`layers.adalora.AdaLoRALinear`, their own Gaussian init).

    Raises:
        InputError: Delta-LoRA with DoRA or with dropout; AdaLoRA with DoRA, Delta-LoRA, rsLoRA or LoRA-FA.
    """
    dtype = adapter_dtype(dtype)
    if adalora:
        clash = next((what for what, on in (("DoRA", use_dora), ("Delta-LoRA", delta_ratio is not None),
                                            ("rsLoRA", use_rslora), ("LoRA-FA (freeze_A)", freeze_A)) if on), None)
        if clash:
            raise InputError(f"AdaLoRA and {clash} do not go together: AdaLoRA's update is B·Λ·A with its own scale "
                             f"alpha/r0, which {clash} would change. Use one of them.")
        for name, r, a in plan:
            replace_module(model, name, AdaLoRALinear(model.get_submodule(name), r, a, dropout,
                                                      None if init is None else "gaussian", dtype))
        return
    if delta_ratio is not None and (use_dora or dropout):
        raise InputError(f"Delta-LoRA takes {'no DoRA' if use_dora else f'no dropout (got {dropout!r})'}: the base's "
                         "update is the plain product B·A on the whole input.")
    cls = DoRALinear if use_dora else LoRALinear
    for name, r, a in plan:
        if delta_ratio is not None:
            module = DeltaLoRALinear(model.get_submodule(name), r, a, use_rslora, init, dtype, delta_ratio)
        else:
            module = cls(model.get_submodule(name), r, a, dropout, use_rslora, init, dtype)
        if freeze_A:
            module.freeze_A()
        replace_module(model, name, module)
