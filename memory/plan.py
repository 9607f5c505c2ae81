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

Peak memory grows monotonically with batch, sequence and rank, so each
search is a binary search over cached activation profiles: milliseconds.

When nothing fits, :attr:`Plan.suggestions` lists single changes that would,
cheapest first (8-bit paged optimizer, checkpointing, chunked loss, fewer
LoRA targets, a smaller rank, a shorter sequence), then a combination of the
cheap ones, then the smallest catalog GPU that holds the run as asked; each
with its predicted footprint.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from quant.errors import InputError

from .catalog import DEFAULT_MODEL
from .footprint import Footprint, estimate, positive_int
from .gpus import GPU, catalog_gpu, known_gpus, parse_gpu
from .spec import ModelSpec, load_spec

log = logging.getLogger(__name__)

RANKS = (8, 16, 32, 64, 128, 256)
SEQ_STEP = 256
MARGIN = 0.05


@dataclass(frozen=True)
class Suggestion:
    """A change to the requested settings and what it would cost.

    Attributes:
        change: what to do, in words (``"use --optimizer paged_adamw_8bit"``).
        settings: the changed settings (estimate() keyword -> value).
        footprint: the prediction with the change applied.
        fits: whether that prediction fits the budget.
        gpu: for the "bigger GPU" suggestion, the catalog GPU.
    """

    change: str
    settings: dict
    footprint: Footprint
    fits: bool
    gpu: str | None = None


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


def _largest(lo: int, hi: int, ok) -> int | None:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (True then False)."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(
    gpu: str | GPU,
    model: str | ModelSpec = DEFAULT_MODEL,
    seq_len: int | str = 2048,
    micro_batch_size: int | str = "auto",
    rank: int | str = 16,
    effective_batch_size: int = 16,
    targets: str | Sequence[str] = "all-linear",
    dropout: float = 0.0,
    dora: bool = False,
    adapter_dtype: str = "bfloat16",
    optimizer: str = "paged_adamw_8bit",
    gradient_checkpointing: bool = True,
    attn: str = "auto",
    loss: str = "chunked",
    loss_chunk_tokens: int = 1024,
    margin: float = MARGIN,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    device: str = "cuda",
    offload_activations: bool = False,
) -> Plan:
    """Choose settings that fit ``gpu`` (see the module docstring).

    Args:
        gpu: a :class:`GPU`, a catalog name or a size (``24GB``).
        model: catalog name, config.json/folder path, or a ModelSpec.
        seq_len, micro_batch_size, rank: an int, or ``"auto"`` to search.
        effective_batch_size: sequences per optimizer step (micro-batch x accumulation).
        margin: fraction of the GPU kept free, in [0, 0.5).
        quant_type, blocksize, double_quant, device, offload_activations: as :func:`memory.estimate`
            (``device='cpu'`` plans a CPU run: no CUDA context or reserve).
        Others: as :func:`memory.estimate`.

    Returns:
        A :class:`Plan`. Never prints.

    Raises:
        InputError: invalid settings, unknown GPU or model.
    """
    gpu = gpu if isinstance(gpu, GPU) else parse_gpu(gpu)
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 0.5:
        raise InputError(f"The safety margin is a fraction of the GPU in [0, 0.5), got {margin!r}.")
    effective_batch_size = positive_int(effective_batch_size, "effective_batch_size")
    auto_seq, auto_batch, auto_rank = seq_len == "auto", micro_batch_size == "auto", rank == "auto"
    for value, what, minimum in ((seq_len, "seq_len", 2), (micro_batch_size, "micro_batch_size", 1), (rank, "rank", 1)):
        if value != "auto":
            positive_int(value, what, minimum)
    usable = int(gpu.total_bytes * (1 - margin))
    fixed = dict(
        targets=targets, dropout=dropout, dora=dora, adapter_dtype=adapter_dtype, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, attn=attn, loss=loss, loss_chunk_tokens=loss_chunk_tokens,
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, device=device,
        offload_activations=offload_activations,
    )

    def est(s: int, b: int, r: int, **over) -> Footprint:
        return estimate(spec, seq_len=s, micro_batch_size=b, rank=r, **dict(fixed, **over))

    notes = [gpu.note]
    r0 = RANKS[0] if auto_rank else rank
    s_cap = int(spec.config.get("max_position_embeddings") or 131072)
    b_fixed = 1 if auto_batch else micro_batch_size
    # 1. sequence length
    if auto_seq:
        steps = _largest(1, max(1, s_cap // SEQ_STEP), lambda k: _fits(est(k * SEQ_STEP, b_fixed, r0), usable))
        seq = (steps or 1) * SEQ_STEP
        if steps is not None:
            notes.append(f"seq_len auto: the longest multiple of {SEQ_STEP} that fits is {seq}")
    else:
        seq = seq_len
    # 2. rank
    if auto_rank:
        fitting = [r for r in RANKS if _fits(est(seq, b_fixed, r), usable)]
        r = fitting[-1] if fitting else RANKS[0]
        if fitting:
            notes.append(f"rank auto: {r} is the largest of {', '.join(map(str, RANKS))} that fits")
    else:
        r = rank
    # 3. micro-batch
    if auto_batch:
        b_max = _largest(1, effective_batch_size, lambda b: _fits(est(seq, b, r), usable)) or 0
        b = max(d for d in range(1, max(b_max, 1) + 1) if effective_batch_size % d == 0)
        if b_max and b != b_max:
            notes.append(
                f"micro-batch {b_max} would fit; {b} is used because it divides the effective batch "
                f"{effective_batch_size}"
            )
    else:
        b = micro_batch_size
        b_max = b if _fits(est(seq, b, r), usable) else 0
    accum = -(-effective_batch_size // b)
    fp = est(seq, b, r)
    fits = _fits(fp, usable)
    if fp.host_bytes:
        notes.append(f"paged optimizer state in host-backed unified memory: {fp.host_bytes / 2**30:.2f} GiB (not on the GPU)")
    if attn == "auto" and fp.attn == "eager":
        notes.append("attention: eager (this architecture has no sdpa path in transformers; eager keeps s x s scores)")
    suggestions: tuple[Suggestion, ...] = ()
    if not fits:
        suggestions = tuple(_suggest(spec, est, seq, b, r, fixed, usable, margin, auto_seq))
    return Plan(
        fits=fits, gpu=gpu, margin=margin, footprint=fp, micro_batch_size=b, gradient_accumulation_steps=accum,
        effective_batch_size=b * accum, rank=r, seq_len=seq, max_micro_batch_size=b_max,
        suggestions=suggestions, notes=tuple(notes),
    )


def _suggest(spec, est, seq, b, r, fixed, usable, margin, auto_seq) -> list[Suggestion]:
    """Changes that would make the run fit, cheapest first (see the module docstring)."""
    out: list[Suggestion] = []

    def add(change: str, **over):
        s, bb, rr = over.pop("seq_len", seq), over.pop("micro_batch_size", b), over.pop("rank", r)
        try:
            fp = est(s, bb, rr, **over)
        except InputError:
            return
        settings = dict(over)
        if s != seq:
            settings["seq_len"] = s
        if rr != r:
            settings["rank"] = rr
        if bb != b:
            settings["micro_batch_size"] = bb
        out.append(Suggestion(change, settings, fp, _fits(fp, usable)))

    cheap = {}
    if fixed["optimizer"] != "paged_adamw_8bit":
        cheap["optimizer"] = "paged_adamw_8bit"
        add("use the 8-bit paged optimizer (--optimizer paged_adamw_8bit)", optimizer="paged_adamw_8bit")
    if not fixed["gradient_checkpointing"]:
        cheap["gradient_checkpointing"] = True
        add("turn gradient checkpointing on", gradient_checkpointing=True)
    if fixed["loss"] == "hf":
        cheap["loss"] = "chunked"
        add(f"compute the loss in chunks of {fixed['loss_chunk_tokens']} tokens (--chunked-loss)", loss="chunked")
    if b > 1:
        add("use micro-batch 1 with more gradient accumulation", micro_batch_size=1)
    if fixed["targets"] not in ("attention", "qv"):
        for preset in ("attention", "qv"):
            add(f"adapt fewer modules (--targets {preset})", targets=preset)
    if r > RANKS[0]:
        add(f"use a smaller rank (--rank {RANKS[0]})", rank=RANKS[0])
    if not auto_seq:
        steps = _largest(1, max(1, (seq - 1) // SEQ_STEP), lambda k: _fits(est(k * SEQ_STEP, b, r), usable))
        if steps is not None:
            add(f"use a shorter sequence (--seq-len {steps * SEQ_STEP})", seq_len=steps * SEQ_STEP)
    if len(cheap) > 1:
        add("combine: " + ", ".join(f"{k}={v}" for k, v in cheap.items()), **cheap)
    fitting = [sg for sg in out if sg.fits]
    if fixed["device"] != "cuda":  # a CPU run's budget is host memory: no GPU to upgrade to
        return fitting
    # the smallest catalog GPU that takes the run as asked
    need = est(seq, b, r).device_total_bytes
    for name in known_gpus():  # smallest first
        g = catalog_gpu(name)
        if need <= g.total_bytes * (1 - margin):
            fitting.append(Suggestion(f"use a bigger GPU ({g.name}, {g.marketed})", {"gpu": g.name}, est(seq, b, r), True, g.name))
            break
    return fitting


def sweep(
    model: str | ModelSpec = DEFAULT_MODEL,
    seq_lens: Sequence[int] = (2048,),
    micro_batch_sizes: Sequence[int] = (1,),
    ranks: Sequence[int] = (16,),
    optimizers: Sequence[str] = ("paged_adamw_8bit",),
    gradient_checkpointing: Sequence[bool] = (True,),
    **fixed,
) -> list[Footprint]:
    """Estimate every combination of the given settings (cartesian product), in order.

    ``fixed`` takes any other :func:`memory.estimate` keyword (targets,
    loss, attn, device...). Model shapes and activation profiles are cached,
    so large sweeps cost milliseconds per configuration.

    Raises:
        InputError: as :func:`memory.estimate`.
    """
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    out = []
    for s, b, r, o, gc in itertools.product(seq_lens, micro_batch_sizes, ranks, optimizers, gradient_checkpointing):
        out.append(estimate(spec, seq_len=s, micro_batch_size=b, rank=r, optimizer=o, gradient_checkpointing=gc, **fixed))
    return out
