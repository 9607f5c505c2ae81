"""Fit a run to a GPU: the largest micro-batch, rank or sequence that fits, or what would.

A configuration *fits* when its predicted device total -- tensor peak +
CUDA context + allocator reserve (:class:`~memory.footprint.Footprint`) --
stays within the GPU's memory minus a safety margin (5% by default).

Search, with every other setting fixed:

* ``rank="auto"``: the largest rank in :data:`RANKS` that fits at micro-batch 1
  (adapter capacity first; batch is recovered by gradient accumulation);
* ``seq_len="auto"``: the longest multiple of 256 (up to the model's
  ``max_position_embeddings``) that fits at micro-batch 1;
* ``micro_batch_size="auto"``: the largest micro-batch that fits, capped by
  the effective batch and lowered to a divisor of it, so that
  ``micro_batch_size * gradient_accumulation_steps == effective_batch_size``.

With ``ram`` (a size, or ``"auto"``: what this machine has available now),
the host side must fit too (:mod:`memory.host`: pinned offload buffers,
paged optimizer state, the loader's transient, the process), within the
same margin; a plan whose host side does not fit says so and suggests
changes that free host memory.

Peak memory grows monotonically with batch, sequence and rank, so each
search is a binary search over cached activation profiles: milliseconds.

When nothing fits, :attr:`Plan.suggestions` lists single changes that would,
cheapest first (8-bit paged optimizer, checkpointing, tiling, chunked loss,
one example per row instead of packed rows, micro-batch 1, fewer LoRA targets,
a smaller rank, a shorter sequence: never past the model's context), then a
combination of the cheap ones, then the smallest catalog GPU that holds the
run as asked; each with its predicted footprint (:mod:`memory.suggest`).

A micro-batch larger than the effective batch (per GPU) is refused; a
sequence past the model's context and a rank above the narrowest adapted
layer's width are planned, with a note saying what they cost.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from quant.errors import InputError

from . import distributed
from .catalog import DEFAULT_MODEL
from .footprint import Footprint, estimate
from .gpus import GPU, parse_gpu, parse_size
from .host import available_ram
from .settings import MARGIN, PLAN_DEFAULTS, Settings, flag_name, with_changes
from .spec import ModelSpec, load_spec
from .suggest import RANKS, SEQ_STEP, Suggestion, largest, suggest
from .targets import narrowest_target

log = logging.getLogger(__name__)

__all__ = ["MARGIN", "RANKS", "SEQ_STEP", "Plan", "Suggestion", "plan", "sweep"]


@dataclass(frozen=True)
class Plan:
    """The settings chosen for a GPU, with the prediction behind them.

    Attributes:
        fits: the chosen configuration fits the budget.
        gpu: the memory budget it was planned for.
        margin: fraction of the GPU kept free.
        footprint: prediction for the chosen settings (the requested ones
            at micro-batch 1 when nothing fits).
        micro_batch_size, gradient_accumulation_steps, effective_batch_size,
            rank, seq_len: the resolved settings.
        max_micro_batch_size: the largest micro-batch that fits (before
            rounding down to a divisor of the effective batch).
        suggestions: when nothing fits, changes that would.
        notes: facts worth showing (units, host-backed memory, choices made).
        settings: the resolved settings: ``auto`` values and ``attn`` replaced
            by what was chosen, ``effective_batch_size`` as run
            (``memory.estimate(model, plan.settings) == plan.footprint``).
        host_budget_bytes: the RAM the host side was checked against (None: not checked).
        host_fits: whether the host side fits it (None: not checked); ``fits`` includes it.
    """

    fits: bool
    gpu: GPU
    margin: float
    footprint: Footprint
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    rank: int
    seq_len: int
    max_micro_batch_size: int
    suggestions: tuple[Suggestion, ...]
    notes: tuple[str, ...]
    settings: Settings
    host_budget_bytes: int | None = None
    host_fits: bool | None = None

    @property
    def budget_bytes(self) -> int:
        return self.gpu.total_bytes

    @property
    def usable_bytes(self) -> int:
        """The budget minus the safety margin."""
        return int(self.gpu.total_bytes * (1 - self.margin))

    @property
    def peak_bytes(self) -> int:
        """Predicted device total (tensor peak + CUDA context + allocator reserve)."""
        return self.footprint.device_total_bytes


def _fits(fp: Footprint, usable: int) -> bool:
    return fp.device_total_bytes <= usable


def plan(
    gpu: str | GPU, model: str | ModelSpec = DEFAULT_MODEL, settings: Settings | None = None, *,
    ram: int | str | None = None, **changes,
) -> Plan:
    """Choose settings that fit ``gpu`` (see the module docstring).

    Example::

        memory.plan("24GB", "llama-3.1-8b", rank="auto")           # micro-batch auto by default
        memory.plan("rtx4090", spec, memory.Settings(seq_len="auto", micro_batch_size=1, offload_activations=True))

    Args:
        gpu: a :class:`GPU`, a catalog name or a size (``24GB``).
        model: catalog name, config.json/folder path, or a :class:`ModelSpec`.
        settings: a :class:`memory.Settings`; ``seq_len``, ``micro_batch_size``
            and ``rank`` may be ``"auto"`` (searched), ``effective_batch_size``
            is sequences per optimizer step (micro-batch x accumulation), and
            ``margin`` the fraction of the GPU kept free (``device='cpu'``
            plans a CPU run: no CUDA context or reserve). Default
            ``memory.Settings(micro_batch_size="auto")``.
        ram: host memory to fit as well: bytes, a size (``64GB``) or ``"auto"``
            (this machine's available RAM, from psutil); None checks no host limit.
        **changes: fields of :class:`memory.Settings` to change.

    Returns:
        A :class:`Plan`. Never prints.

    Raises:
        InputError: invalid settings, unknown GPU or model.
    """
    gpu = gpu if isinstance(gpu, GPU) else parse_gpu(gpu)
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    base = with_changes(settings, changes, PLAN_DEFAULTS)
    auto_seq, auto_batch, auto_rank = base.seq_len == "auto", base.micro_batch_size == "auto", base.rank == "auto"
    if base.gpus == "auto" or base.offload_params == "auto" or (base.gpus > 1 and base.strategy == "auto"):
        return distributed.choose(plan, gpu, spec, base, ram)
    if "auto" in (base.tiled_mlp, base.tiled_norms):
        return _tiling_chosen(gpu, spec, base, ram, auto_seq)
    margin, gpus = base.margin, base.gpus
    effective = distributed.per_gpu_batch(base.effective_batch_size, gpus)
    if not auto_batch and base.micro_batch_size > effective:
        per_gpu = f" ({effective} on each of {gpus} GPUs)" if gpus > 1 else ""
        mb, eff = flag_name("micro_batch_size"), flag_name("effective_batch_size")
        raise InputError(
            f"micro_batch_size {base.micro_batch_size} ({mb}) is larger than effective_batch_size "
            f"{base.effective_batch_size} ({eff}){per_gpu}: one micro-batch would hold more sequences than an "
            f"optimizer step takes. Use a micro-batch of {effective} or less, raise the effective batch, or let "
            f"the planner choose (micro_batch_size auto)."
        )
    usable = int(gpu.total_bytes * (1 - margin))
    ram_bytes = _ram_bytes(ram)
    ram_usable = None if ram_bytes is None else int(ram_bytes * (1 - margin))

    def ok(fp: Footprint) -> bool:
        return _fits(fp, usable) and (ram_usable is None or fp.host.total_bytes <= ram_usable)

    def est(s: int, b: int, r: int, **over) -> Footprint:
        return estimate(spec, dataclasses.replace(base, seq_len=s, micro_batch_size=b, rank=r, **over))

    notes = [gpu.note] if gpu.note else []  # how a typed size was read; a measured budget needs none
    r0 = RANKS[0] if auto_rank else base.rank
    context = spec.context
    s_cap = context or 131072
    b_fixed = 1 if auto_batch else base.micro_batch_size
    # 1. sequence length
    if auto_seq:
        steps = largest(1, max(1, s_cap // SEQ_STEP), lambda k: ok(est(k * SEQ_STEP, b_fixed, r0)))
        seq = (steps or 1) * SEQ_STEP
        if steps is not None and steps * SEQ_STEP < s_cap:
            notes.append(f"seq_len auto: the longest multiple of {SEQ_STEP} that fits is {seq}")
        elif steps is not None:  # the model's own limit, not memory's: say how far memory alone would go
            beyond = largest(steps, 16 * steps, lambda k: ok(est(k * SEQ_STEP, b_fixed, r0))) * SEQ_STEP
            notes.append(
                f"seq_len auto: {seq} is the model's max_position_embeddings; memory alone would fit "
                + (f"{beyond} (an explicit --seq-len past the model's positions)" if beyond > seq else "no more")
            )
    else:
        seq = base.seq_len
        if context is not None and seq > context:  # memory may allow it; the model was never trained that long
            notes.append(
                f"{flag_name('seq_len')} {seq} is past the model's context of {context} positions "
                f"(max_position_embeddings): positions beyond it were never trained, and a learned position table "
                f"has no row for them, so expect poor results unless the config's rope_scaling is extended to "
                f"cover it; {flag_name('seq_len')} {context} or less keeps within it"
            )
    # 2. rank
    if auto_rank:
        fitting = [r for r in RANKS if ok(est(seq, b_fixed, r))]
        r = fitting[-1] if fitting else RANKS[0]
        if fitting:
            notes.append(f"rank auto: {r} is the largest of {', '.join(map(str, RANKS))} that fits")
    else:
        r = base.rank
    # 3. micro-batch
    if auto_batch:
        b_max = largest(1, effective, lambda b: ok(est(seq, b, r))) or 0
        b = max(d for d in range(1, max(b_max, 1) + 1) if effective % d == 0)
        if b_max and b != b_max:
            notes.append(
                f"micro-batch {b_max} would fit; {b} is used because it divides the effective batch {effective}"
            )
    else:
        b = base.micro_batch_size
        b_max = b if ok(est(seq, b, r)) else 0
    accum = -(-effective // b)
    if b * accum * gpus != base.effective_batch_size:
        exact = [d for d in range(1, effective + 1) if effective % d == 0]
        notes.append(f"effective batch {base.effective_batch_size} runs as {b * accum * gpus} (micro-batch {b} x "
                     f"{accum} accumulation" + (f" x {gpus} GPUs" if gpus > 1 else "") + "): the accumulation "
                     f"steps are rounded up, so a step never takes fewer sequences than asked; a micro-batch of "
                     f"{', '.join(map(str, exact))} divides it exactly")
    fp = est(seq, b, r)
    narrow = narrowest_target(spec, fp.targets)  # the estimate resolved the targets (and refused bad ones)
    if r > narrow[1]:
        notes.append(
            f"rank {r} is larger than the smallest adapted layer ({narrow[0]}: {narrow[1]} features), "
            f"so its adapter product B @ A cannot have rank above {narrow[1]}: the extra rank only costs memory; "
            f"a rank of {narrow[1]} or less gives the same capacity"
        )
    host_fits = None if ram_usable is None else fp.host.total_bytes <= ram_usable
    fits = _fits(fp, usable) and host_fits is not False
    host_line = f"host memory: {fp.host.describe()}"
    if ram_bytes is not None:
        verdict = "fits" if host_fits else "does NOT fit"
        host_line += f"; {verdict} in {ram_usable / 2**30:.2f} GiB usable of {ram_bytes / 2**30:.2f} GiB RAM"
    notes.append(host_line)
    if gpus > 1:
        notes.append(f"host memory is per process: a node running k of the {gpus} processes needs k times it")
    if base.attn == "auto" and fp.attn == "eager":
        notes.append("attention: eager (this architecture has no sdpa path in transformers; eager keeps s x s scores)")
    suggestions: tuple[Suggestion, ...] = ()
    if not fits:
        suggestions = tuple(suggest(est, ok, seq, b, r, base, auto_seq, ram_usable, s_cap))
    resolved = dataclasses.replace(
        base, seq_len=seq, micro_batch_size=b, rank=r, effective_batch_size=b * accum * gpus, attn=fp.attn
    )
    return Plan(
        fits=fits, gpu=gpu, margin=margin, footprint=fp, micro_batch_size=b, gradient_accumulation_steps=accum,
        effective_batch_size=b * accum * gpus, rank=r, seq_len=seq, max_micro_batch_size=b_max,
        suggestions=suggestions, notes=tuple(notes), settings=resolved, host_budget_bytes=ram_bytes,
        host_fits=host_fits,
    )


def _tiling_chosen(gpu: GPU, spec: ModelSpec, base: Settings, ram, auto_seq: bool) -> Plan:
    """``tiled_mlp`` / ``tiled_norms`` ``"auto"``: every auto switch off when that plan fits (tiling costs one more
    forward of the tiled modules per step); all of them on when only that fits, or when ``seq_len="auto"``
    reaches further with them. One decision for both: each pays at the same long sequences."""
    autos = [name for name in ("tiled_mlp", "tiled_norms") if getattr(base, name) == "auto"]
    off = plan(gpu, spec, dataclasses.replace(base, **dict.fromkeys(autos, False)), ram=ram)
    if off.fits and not auto_seq:
        return off
    on = plan(gpu, spec, dataclasses.replace(base, **dict.fromkeys(autos, True)), ram=ram)
    if on.fits and (not off.fits or on.seq_len > off.seq_len):
        why = f"seq_len {on.seq_len} instead of {off.seq_len}" if off.fits else "the plan fits only with it"
        what = " and ".join({"tiled_mlp": "MLP", "tiled_norms": "norms"}[a] for a in autos)
        note = f"tiled {what} auto: on, {base.tile_tokens} tokens per tile ({why})"
        return dataclasses.replace(on, notes=on.notes + (note,))
    return off


def _ram_bytes(ram: int | str | None) -> int | None:
    """``plan``'s ``ram`` argument in bytes (None: no host check).

    Raises:
        InputError: not a positive size or ``"auto"``.
    """
    if ram is None:
        return None
    if isinstance(ram, str) and ram.strip().lower() == "auto":
        return available_ram()
    if isinstance(ram, int) and not isinstance(ram, bool):
        if ram <= 0:
            raise InputError(f"ram must be a positive number of bytes, a size such as '64GB' or 'auto'; got {ram}.")
        return ram
    return parse_size(ram, "--ram")


def sweep(
    model: str | ModelSpec = DEFAULT_MODEL,
    settings: Settings | None = None,
    *,
    seq_lens: Sequence[int] | None = None,
    micro_batch_sizes: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    optimizers: Sequence[str] | None = None,
    gradient_checkpointing: Sequence[bool] | None = None,
    **changes,
) -> list[Footprint]:
    """Estimate every combination of the given values (cartesian product), in order.

    Example::

        memory.sweep(spec, seq_lens=[1024, 2048, 4096], micro_batch_sizes=[1, 2, 4])
        memory.sweep(spec, memory.Settings(loss="hf", device="cpu"), ranks=[8, 16, 32])

    Args:
        model: as :func:`memory.estimate`.
        settings: the :class:`memory.Settings` every row starts from (default ``memory.Settings()``).
        seq_lens, micro_batch_sizes, ranks, optimizers, gradient_checkpointing:
            the values to combine; each defaults to the settings' one value.
        **changes: other fields of :class:`memory.Settings`, the same for every row.

    Model shapes and activation profiles are cached, so large sweeps cost
    milliseconds per configuration.

    Raises:
        InputError: as :func:`memory.estimate`.
    """
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    base = with_changes(settings, changes)
    axes = (
        *(axis if axis is not None else (default,) for axis, default in (
            (seq_lens, base.seq_len), (micro_batch_sizes, base.micro_batch_size), (ranks, base.rank),
            (optimizers, base.optimizer), (gradient_checkpointing, base.gradient_checkpointing),
        )),
    )
    return [
        estimate(spec, base, seq_len=s, micro_batch_size=b, rank=r, optimizer=o, gradient_checkpointing=gc)
        for s, b, r, o, gc in itertools.product(*axes)
    ]
