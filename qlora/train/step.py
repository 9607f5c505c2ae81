"""One optimizer step's gradients and an evaluation pass: the arithmetic the loop and the bench share.

Both go through a :class:`qlora.train.parallel.ParallelModel` (a plain model on one process is wrapped in a
one-process one), so the same code runs on one process and on N ranks.
"""

from __future__ import annotations

import torch

from qlora.train.loss import target_count
from qlora.train.parallel import ParallelModel, World, all_sum
from qlora.train.setup import row_targets


def batch_of(rows: dict, idx: list[int], device: torch.device) -> dict:
    """Rows ``idx`` of every tensor in ``rows`` (host), moved to ``device``."""
    return {k: v[idx].to(device, non_blocking=True) for k, v in rows.items()}


def accumulate_gradients(model, micro_batches: list[dict], chunk_tokens: int | None, autocast_dtype: torch.dtype,
                         scaler=None, n_targets: list[int] | None = None, *, parallel: ParallelModel | None = None,
                         step_targets: int | None = None) -> torch.Tensor:
    """Forward/backward every micro-batch of one optimizer step (this rank's share of it).

    Each micro-batch's summed loss is divided by the target-token count of the *whole* step, so the
    accumulated gradient equals that of one big batch however the step is split into micro-batches
    (and ranks). ``n_targets``: each micro-batch's target count when the caller knows it; ``None`` counts
    the labels (one host sync per micro-batch on a GPU).

    Args:
        parallel: the :class:`qlora.train.parallel.ParallelModel` on N ranks (``model`` is then ignored);
            default: ``model`` on this process alone.
        step_targets: the step's target count over all ranks; default this rank's micro-batches' sum.

    Returns:
        This rank's part of the step's mean loss per target token (the whole of it on one process): a float64
        0-dim tensor on the device, not yet read back (``float()`` it when the number is needed).
    """
    par = parallel or ParallelModel(model, World(), "single", chunk_tokens, autocast_dtype)
    counts = [target_count(b["labels"]) for b in micro_batches] if n_targets is None else n_targets
    denom = max(1, sum(counts) if step_targets is None else step_targets)
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["input_ids"].device)
    for k, (b, n) in enumerate(zip(micro_batches, counts)):
        with par.accumulating(sync=k == len(micro_batches) - 1):  # gradients cross ranks once per step
            loss_sum = par.loss(b, n)
            loss = loss_sum * par.loss_scale / denom
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss_sum.detach()  # summed on the device in float64 (as a Python float sum would): no sync here
    return total / denom


@torch.no_grad()
def evaluate(model, rows: dict, micro_batch: int, chunk_tokens: int | None, autocast_dtype, device,
             parallel: ParallelModel | None = None) -> float:
    """Token-weighted mean eval loss (nats/token) over all eval rows (split over the ranks of ``parallel``)."""
    par = parallel or ParallelModel(model, World(), "single", chunk_tokens, autocast_dtype)
    world = par.world
    was_training = par.model.training
    par.model.eval()
    targets = row_targets(rows)  # counted where the rows live (the host, in the trainer)
    n_rows = rows["input_ids"].shape[0]
    starts = list(range(0, n_rows, micro_batch))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, targets)
    # every rank runs the same number of forwards (FSDP2 gathers in each): a rank past the end reruns
    # batch 0 and counts nothing
    for k in range(-(-len(starts) // world.size)):
        j = k * world.size + world.rank
        start = starts[j] if j < len(starts) else 0
        idx = list(range(start, min(start + micro_batch, n_rows)))
        n = sum(targets[i] for i in idx)
        loss = par.loss(batch_of(rows, idx, device), n)
        if j < len(starts):
            sums[0] += loss
            sums[1] += n
    par.model.train(was_training)
    total, n = all_sum(world, sums).tolist()  # one host sync per evaluation
    return total / max(n, 1)
