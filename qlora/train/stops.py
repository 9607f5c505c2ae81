"""How a run stops: the exit codes, :class:`TrainResult`, the signal flag and the out-of-memory test.

A run ends ``done``, or stops on a signal (exit 128 + its number, as a shell reports it: SIGINT 130,
SIGTERM 143), a non-finite loss (:data:`EXIT_NAN`) or running out of memory (:data:`EXIT_OOM`); each
stop after the first step saves a checkpoint first (:mod:`qlora.train.loop`).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.tasks import TaskScore

EXIT_OOM, EXIT_NAN = 3, 4  # a stop by signal exits 128 + its number, as a shell reports it (SIGINT 130, SIGTERM 143)
OOM_ADVICE = ("Lower micro_batch_size or seq_len, or use 'qlora plan' to pick settings; qlora does not shrink the "
              "batch silently.")


@dataclass
class TrainResult:
    """How a run ended: its folder, last step, why it stopped, eval losses by step and the exit code."""

    output_dir: Path
    steps: int
    stopped: str  # "done", "signal", "oom", "nan"
    resumed_from: int | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    task_scores: list[tuple[int, TaskScore]] = field(default_factory=list)  # (step, score) at the start and the end
    wall_s: float = 0.0
    exit_code: int = 0

    @property
    def nothing_to_do(self) -> bool:
        """True for a re-run of a finished run: no step was trained (its adapter and plots were rewritten)."""
        return self.stopped == "done" and self.resumed_from is not None and self.resumed_from >= self.steps


def is_oom(e: BaseException) -> bool:
    """True for running out of memory anywhere: CUDA's ``torch.OutOfMemoryError``, Python's ``MemoryError`` and
    the CPU allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), which torch raises as
    a plain RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def first_line(e: BaseException) -> str:
    """The first line of an exception's text, at most 200 characters (torch's OOM texts run long)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
