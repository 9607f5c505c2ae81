"""Run by tests/qlora/test_parallel.py under ``torchrun --nproc-per-node 2``: checks that need a process group.

``python -m torch.distributed.run --standalone --nproc-per-node 2 parallel_worker.py MODE OUT`` writes one JSON
file per rank into OUT; the test reads them. Modes:

* ``nf4``: FSDP2 shards a model of NF4 and FP4 linears whose byte counts do not divide by 2; each rank holds
  about half of every packed tensor, and the gathered weight dequantizes to exactly the unsharded one.
* ``agree``: :func:`qlora.train.parallel.check_same` on a value that differs on rank 1 (it must refuse, on
  every rank, naming the rank) and on one that agrees.
* ``memory-STRATEGY-VOCAB-SEQ``: one rank's live tensor bytes (:class:`memory.tracker.LiveTensorTracker`) at
  rest and over a training step of a small Llama wrapped by ``ParallelModel``, next to ``memory.estimate`` for
  the same per-GPU settings.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qlora.train.parallel import World, check_same, close_world, init_world
from quant import InputError, NF4Linear


def _nf4(world: World) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same weights on every rank, as when all read one checkpoint
    shapes = [(96, 66), (64, 200), (33, 64)]  # 3168, 6400, 1056 codes: odd byte and block counts in places
    dense = [nn.Linear(i, o, bias=False) for o, i in shapes]
    layers = nn.ModuleList()
    for k, lin in enumerate(dense):
        q = NF4Linear.from_linear(lin, quant_type="fp4" if k == 2 else "nf4", compute_dtype=torch.float32)
        layers.append(q)
    reference = [q.dequantize(torch.float32).clone() for q in layers]
    x = [torch.randn(5, q.in_features) for q in layers]
    ref_out = [q(xi) for q, xi in zip(layers, x)]
    whole = {name: {t: getattr(q, t).numel() for t in NF4Linear.SHARDED} for name, q in layers.named_children()}
    for q in layers:
        q.make_shardable()
        fully_shard(q)
    local = {name: {t: getattr(q, t).to_local().numel() for t in NF4Linear.SHARDED}
             for name, q in layers.named_children()}
    outs = [q(xi) for q, xi in zip(layers, x)]  # forward gathers, computes, frees
    for q in layers:
        q.unshard()
    exact = [bool(torch.equal(q.dequantize(torch.float32), r)) for q, r in zip(layers, reference)]
    sd_keys = sorted(layers.state_dict())
    return {"whole": whole, "local": local, "exact": exact, "outputs_equal": [bool(torch.equal(a, b)) for a, b in
            zip(outs, ref_out)], "state_dict_keys": sd_keys, "quant_types": [q.quant_type for q in layers]}


def _agree(world: World) -> dict:
    check_same(world, "recipe", {"lora": {"rank": 8}, "seed": 0})  # equal: passes
    try:
        check_same(world, "recipe", {"lora": {"rank": 8 + world.rank}})
    except InputError as e:
        return {"refused": str(e)}
    return {"refused": None}


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def _fsdp_resizes_reported(tracker):
    """FSDP2 allocates and frees gathered parameters with ``UntypedStorage.resize_``, which no dispatch mode
    sees: report each of its resizes to the tracker while the step runs."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    originals = _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage

    def alloc(t):
        originals[0](t)
        tracker.note_resize(t)

    def free(t):
        originals[1](t)
        tracker.note_resize(t)

    _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = alloc, free, alloc
    try:
        yield
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = originals


def _memory(world: World, strategy: str, vocab: int, seq: int) -> dict:
    """One rank's live tensor bytes at rest (the persistent terms) and over one step, next to the planner."""
    import memcheck
    from memory_accuracy import TINY

    import memory
    from memory.tracker import LiveTensorTracker
    from qlora.lora.surgery import lora_parameters
    from qlora.train.loop import accumulate_gradients
    from qlora.train.optim import build_optimizer
    from qlora.train.parallel import ParallelModel

    config = dict(TINY["tiny-llama"], vocab_size=vocab)
    batch, rank = 1, 8
    model = memcheck.random_qlora_model(config, rank=rank)
    par = ParallelModel(model, world, strategy, 1024, torch.bfloat16)
    opt = build_optimizer([{"params": lora_parameters(model)}], "adamw", lr=1e-4)
    gen = torch.Generator().manual_seed(world.rank)

    def step() -> None:
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=gen)
        pos = torch.arange(seq).expand(batch, seq)
        accumulate_gradients(model, [{"input_ids": ids, "labels": ids.clone(), "position_ids": pos}], 1024,
                             torch.bfloat16, parallel=par)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    held = [_local(t) for t in [*model.parameters(), *model.buffers(), *state]]
    seen, at_rest = set(), 0
    for t in held:  # storages, each once (tied weights, views)
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            at_rest += t.untyped_storage().nbytes()
    tracker = LiveTensorTracker("cpu")
    with tracker, _fsdp_resizes_reported(tracker):
        tracker.track(held)
        step()
    spec = memory.spec_from_config(config, name=f"tiny-llama-{vocab}")
    fp = memory.estimate(spec, memory.Settings(
        seq_len=seq, micro_batch_size=batch, rank=rank, optimizer="adamw", device="cpu", gpus=world.size,
        strategy=strategy))
    persistent = sum(fp.breakdown[k] for k in ("nf4_weights", "embeddings_16bit", "lm_head_16bit",
                                                "norms_biases_buffers", "lora_params", "optimizer_state"))
    # DDP's gradient buckets live in its reducer, out of reach of the count above (the step's peak sees them)
    return {"at_rest": at_rest, "predicted_persistent": persistent, "peak": tracker.peak,
            "predicted_peak": fp.tensor_peak_bytes, "breakdown": fp.breakdown, "phase": fp.peak_phase}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    world, _ = init_world(torch.device("cpu"), "gloo", 60)
    if mode.startswith("memory-"):  # memory-STRATEGY-VOCAB-SEQ
        _, strategy, vocab, seq = mode.split("-")
        result = _memory(world, strategy, int(vocab), int(seq))
    else:
        result = {"nf4": _nf4, "agree": _agree}[mode](world)
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    close_world(world)


if __name__ == "__main__":
    main()
