"""What would make a run fit: the searches' steps and :func:`suggest`, the changes a plan lists when
nothing fits (cheapest first), each with its predicted footprint.

:func:`memory.plan` calls it with two closures over the plan's model and budget: ``est(seq, batch, rank,
**changes)`` predicts a :class:`~memory.footprint.Footprint`, ``ok(footprint)`` says whether it fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.errors import InputError

from .footprint import Footprint
from .gpus import catalog_gpu, known_gpus
from .settings import Settings, flag_name

RANKS = (8, 16, 32, 64, 128, 256)
SEQ_STEP = 256


@dataclass(frozen=True)
class Suggestion:
    """A change to the requested settings and what it would cost.

    Attributes:
        change: what to do, in words (``"use --optimizer paged_adamw_8bit"``).
        settings: the changed settings (:class:`memory.Settings` field -> value;
            ``{"gpu": name}`` for the bigger-GPU suggestion).
        footprint: the prediction with the change applied.
        fits: whether that prediction fits the budget.
        gpu: for the "bigger GPU" suggestion, the catalog GPU.
    """

    change: str
    settings: dict
    footprint: Footprint
    fits: bool
    gpu: str | None = None


def largest(lo: int, hi: int, ok) -> int | None:
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


def suggest(est, ok, seq: int, b: int, r: int, base: Settings, auto_seq: bool, ram: int | None,
             s_cap: int) -> list[Suggestion]:
    """Changes that would make the run fit, cheapest first (see the module docstring).

    ``ok(footprint)`` says whether a prediction fits (device and, with ``ram``, host); a shorter sequence
    is never suggested past ``s_cap``, the model's context.
    """
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
        out.append(Suggestion(change, settings, fp, ok(fp)))

    cheap = {}
    asked = est(seq, b, r)
    if ram is not None and asked.host.total_bytes > ram:  # host-side levers first: they cost no device memory
        if base.offload_activations:
            add("keep layer inputs on the GPU (offload_activations off)", offload_activations=False)
        if base.optimizer.startswith("paged"):
            add("keep the optimizer state on the GPU (--optimizer adamw_8bit)", optimizer="adamw_8bit")
    if base.optimizer != "paged_adamw_8bit":
        cheap["optimizer"] = "paged_adamw_8bit"
        add(f"use the 8-bit paged optimizer ({flag_name('optimizer')} paged_adamw_8bit)", optimizer="paged_adamw_8bit")
    if not base.gradient_checkpointing:
        cheap["gradient_checkpointing"] = True
        add("turn gradient checkpointing on", gradient_checkpointing=True)
    # "auto" was tried both ways already (_tiling_chosen); not in "combine": at short sequences
    # tiling costs memory (the T x h output and input-gradient buffers), it pays only at long ones
    if base.tiled_mlp is False:
        add(f"run the MLP in tiles of {base.tile_tokens} tokens ({flag_name('tiled_mlp')} on)", tiled_mlp=True)
    if base.tiled_norms is False:
        add(f"run the norms in tiles of {base.tile_tokens} tokens ({flag_name('tiled_norms')} on)", tiled_norms=True)
    if base.loss == "hf":
        cheap["loss"] = "chunked"
        add(f"compute the loss in chunks of {base.loss_chunk_tokens} tokens ({flag_name('loss_chunk_tokens')})",
            loss="chunked")
    if base.packed:  # shown only if it fits, like every change here (it frees nothing under eager)
        add("one example per row: no s x s block mask (recipe data.packing: false)", packed=False)
    if b > 1:
        add("use micro-batch 1 with more gradient accumulation", micro_batch_size=1)
    if base.targets not in ("attention", "qv"):
        for preset in ("attention", "qv"):
            add(f"adapt fewer modules ({flag_name('targets')} {preset})", targets=preset)
    if r > RANKS[0]:
        add(f"use a smaller rank ({flag_name('rank')} {RANKS[0]})", rank=RANKS[0])
    if not auto_seq:
        steps = largest(1, max(1, min(seq - 1, s_cap) // SEQ_STEP), lambda k: ok(est(k * SEQ_STEP, b, r)))
        if steps is not None:
            add(f"use a shorter sequence ({flag_name('seq_len')} {steps * SEQ_STEP})", seq_len=steps * SEQ_STEP)
    if len(cheap) > 1:
        add("combine: " + ", ".join(f"{k}={v}" for k, v in cheap.items()), **cheap)
    fitting = [sg for sg in out if sg.fits]
    if ram is not None and asked.host.total_bytes > ram:
        need = asked.host.total_bytes / (1 - base.margin)
        change = f"use a machine with at least {need / 2**30:.1f} GiB of free RAM"
        fitting.append(Suggestion(change, {"ram": int(need)}, asked, True))
        return fitting
    if base.device != "cuda":  # a CPU run's budget is host memory: no GPU to upgrade to
        return fitting
    # the smallest catalog GPU that takes the run as asked
    for name in known_gpus():  # smallest first
        g = catalog_gpu(name)
        if asked.device_total_bytes <= g.total_bytes * (1 - base.margin):
            change = f"use a bigger GPU ({g.name}, {g.marketed})"
            fitting.append(Suggestion(change, {"gpu": g.name}, asked, True, g.name))
            break
    return fitting
