"""A run's resumable state: what ``trainer_state.pt`` holds, gathered from every rank and given back to each.

:func:`collect` builds the mapping a checkpoint stores (the optimizer's state, gathered from FSDP2's shards
to whole tensors; the scheduler; the fp16 gradient scaler; every rank's RNG state; the step), and
:func:`restore` puts it back into a freshly built run. The folder it goes into, and the atomic write, are
:mod:`qlora.train.checkpoints`'.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora.train import checkpoints as ckpts
from qlora.train.parallel import ParallelModel, gather_objects, load_optimizer_state, optimizer_state
from quant.errors import InputError


def collect(par: ParallelModel, opt: torch.optim.Optimizer, sched, scaler, step: int) -> dict | None:
    """The trainer state of ``step`` on rank 0, None on the others.

    Every rank must call it (a collective on N ranks: the optimizer's shards and the RNG states are gathered).
    """
    optimizer = optimizer_state(par, opt)
    rngs = gather_objects(par.world, ckpts.rng_state())
    if not par.world.main:
        return None
    st = {"step": step, "optimizer": optimizer, "scheduler": sched.state_dict(), "rng": rngs[0]}
    if par.world.distributed:
        st["rng_ranks"] = rngs
    if scaler is not None:
        st["scaler"] = scaler.state_dict()
    return st


def restore(state: dict, par: ParallelModel, opt: torch.optim.Optimizer, sched, scaler, checkpoint: Path) -> int:
    """Load ``state`` (from :func:`collect`, read back) into a run; returns its step.

    Each rank gets its own RNG stream back when the run has as many ranks as wrote it; otherwise rank 0's
    (LoRA dropout then draws other masks than the interrupted run would have).

    Raises:
        InputError: the optimizer's parameter groups differ from the ones this run builds, or the checkpoint
            was written under another strategy family (:func:`qlora.train.parallel.load_optimizer_state`).
    """
    saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    built = [len(g["params"]) for g in opt.param_groups]
    if saved != built:  # e.g. a checkpoint of an earlier qlora, which kept all adapter tensors in one group
        raise InputError(
            f"Checkpoint {str(checkpoint)!r} holds optimizer state for parameter groups of {saved} tensors, "
            f"but this run builds groups of {built} (A, B and DoRA magnitudes apart). It was written by an earlier "
            f"qlora or with other LoRA settings, so it cannot be resumed exactly. Resume it with the qlora and "
            f"recipe that wrote it, or start afresh in a new output_dir."
        )
    load_optimizer_state(par, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    world, ranks = par.world, state.get("rng_ranks")
    if world.distributed and ranks is not None and len(ranks) == world.size:
        ckpts.set_rng_state(ranks[world.rank])
    else:  # one process, or another number of ranks than wrote it: rank 0's stream
        ckpts.set_rng_state(state["rng"])
    return int(state["step"])
