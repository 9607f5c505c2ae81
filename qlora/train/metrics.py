"""Run metrics: per-step numbers averaged over the ``log_steps`` interval, metrics.jsonl (crash-tolerant),
optional TensorBoard, end-of-run plots."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from quant.errors import InputError
from quant.files import atomic_file, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's numbers, already on the host (the loop synced them once for the step).

    Attributes:
        loss: mean loss per target token (nats).
        lr: the learning rate the step used (of the first optimizer group).
        grad_norm: total gradient norm before clipping.
        tokens: target tokens (the loss's denominator).
        seq_tokens: all tokens the step processed, padding included (``tok_per_s`` counts these).
        seconds: wall time of the step.
        peak_bytes, peak_kind: the measured peak so far and what measured it.
        diagnostics: ``lora/...`` adapter diagnostics, on the steps that compute them.
    """

    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seq_tokens: int
    seconds: float
    peak_bytes: int
    peak_kind: str
    diagnostics: dict = field(default_factory=dict)


@dataclass
class LogWindow:
    """The train steps since the last written record; :meth:`record` folds them into one record.

    With ``log_steps: 1`` a record is exactly one step's numbers. Over a longer
    interval it holds what a reader of a per-step log expects: ``loss`` and
    ``grad_norm`` averaged over the steps, ``tokens`` summed, ``tok_per_s``
    as all tokens over all seconds, ``lr`` and the peak of the last step,
    and the diagnostics of the last step that computed them.
    """

    steps: list[StepStats] = field(default_factory=list)

    def add(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, step: int, predicted_peak_bytes: int) -> dict:
        """The record for the interval ending at ``step``; empties the window.

        Raises:
            ValueError: the window is empty (there is nothing to average).
        """
        if not self.steps:
            raise ValueError(f"no train step to log at step {step}")
        s, n, last = self.steps, len(self.steps), self.steps[-1]
        rec = {"step": step, "loss": sum(x.loss for x in s) / n, "lr": last.lr,
               "grad_norm": sum(x.grad_norm for x in s) / n, "tokens": sum(x.tokens for x in s),
               "tok_per_s": sum(x.seq_tokens for x in s) / max(sum(x.seconds for x in s), 1e-9),
               "peak_bytes": last.peak_bytes, "peak_kind": last.peak_kind, "predicted_peak_bytes": predicted_peak_bytes}
        for x in s:
            rec.update(x.diagnostics)
        self.steps = []
        return rec


class MetricsLog:
    """Append-only ``metrics.jsonl``; each record is one line, flushed and fsynced.

    On resume the file is cut back to the records at or before the resumed
    step (and any torn last line from a kill is dropped), so a resumed run's
    log equals an uninterrupted one.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write from a killed run
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))  # a kill here keeps the old log whole
        self.records = [json.loads(k) for k in kept]
        self._f = open(self.path, "a")
        self._tb = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict) -> None:
        self.records.append(record)
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # a full disk: the checkpoints written so far stay the resume point
            raise InputError(f"Cannot append to {str(self.path)!r}: {e.strerror}. The newest complete checkpoint "
                             "next to it is where the same command resumes once there is room.") from None
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    log.info("TensorBoard logs in %s", path)
    return SummaryWriter(str(path))


def peak_memory(device) -> tuple[int, str]:
    """``(bytes, what measured them)``: CUDA's allocator peak (a host counter, no sync), else the peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS"


def log_line(rec: dict, total_steps: int) -> str:
    """One train record as a plain line, for output that is not a terminal (a log file, CI, nohup):
    ``step 20/60: loss 2.3412, lr 1.00e-04, 812 tok/s, peak 1.21 GiB (host peak RSS), eval loss 2.2871 (ppl 9.85)``."""
    line = (f"step {rec['step']}/{total_steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
            f"{rec['tok_per_s']:.0f} tok/s, peak {rec['peak_bytes'] / 2**30:.2f} GiB ({rec['peak_kind']})")
    if "eval_loss" in rec:
        line += f", eval loss {rec['eval_loss']:.4f} (ppl {rec['eval_ppl']:.2f})"
    return line


def progress_bar(enabled: bool, total: int, initial: int):
    """A tqdm bar over optimizer steps, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def plot_run(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Write loss.png (train/eval loss per step) and memory.png (predicted vs measured peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train or evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        written.append(_finish(plt, fig, ax, "cross-entropy (nats/token)", out_dir / "loss.png"))
    mem = [(r["step"], r["peak_bytes"] / 2**30, r.get("predicted_peak_bytes", 0) / 2**30)
           for r in records if "peak_bytes" in r]
    if mem:
        steps, meas, pred = zip(*mem)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, meas, label=mem_label(records))
        if any(pred):
            ax.plot(steps, pred, "--", label="planner prediction")
        written.append(_finish(plt, fig, ax, "GiB", out_dir / "memory.png"))
    return written


def _finish(plt, fig, ax, ylabel: str, path: Path) -> Path:
    """Label, save and close one per-step plot."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # format given: the temporary name has no .png suffix
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def mem_label(records: list[dict]) -> str:
    kinds = {r.get("peak_kind") for r in records if "peak_kind" in r}
    return "measured peak (" + ", ".join(sorted(k for k in kinds if k)) + ")" if kinds else "measured peak"
