"""Run by tests/qlora/test_parallel.py under ``torchrun --nproc-per-node 2``: checks that need a process group.

``python -m torch.distributed.run --standalone --nproc-per-node 2 parallel_worker.py MODE [MODE ...] OUT`` writes
one JSON file per rank into OUT, mode -> result (one launch for all: each costs seconds of imports). Modes:

* ``nf4``: FSDP2 shards a model of NF4 and FP4 linears whose byte counts do not divide by 2; each rank holds
  about half of every packed tensor, and the gathered weight dequantizes to exactly the unsharded one.
* ``agree``: :func:`qlora.train.parallel.check_same` on a value that differs on rank 1 (it must refuse, on
  every rank, naming the rank) and on one that agrees.
* ``memory-STRATEGY-VOCAB-SEQ``: one rank's live tensor bytes (:class:`memory.tracker.LiveTensorTracker`) at
  rest and over a training step of a small Llama wrapped by ``ParallelModel``, next to ``memory.estimate`` for
  the same per-GPU settings.
* ``load``: :func:`qlora.train.build.build_model` of a 16-layer Llama checkpoint, whole and with FSDP2 sharding
  each layer as it loads: one rank's live tensor bytes at the peak of each, the whole base's bytes, and the
  planner's ``load`` phase for the sharded one.
"""

from __future__ import annotations

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


def _memory(world: World, strategy: str, vocab: int, seq: int, arch: str) -> dict:
    import memcheck
    from memory_accuracy import TINY

    got = memcheck.check_rank(world, strategy, dict(TINY[arch], vocab_size=vocab), 1, seq)
    return {"at_rest": got.at_rest, "predicted_persistent": got.predicted_at_rest, "peak": got.peak,
            "predicted_peak": got.predicted_peak, "breakdown": got.footprint.breakdown,
            "phase": got.footprint.peak_phase}


def _load(world: World, out: Path) -> dict:
    import memcheck

    return memcheck.check_load(world, out / "load-ckpt")


def main() -> None:
    *modes, out = sys.argv[1:]
    world, _ = init_world(torch.device("cpu"), "gloo", 60)
    results = {}
    for mode in modes:
        if mode.startswith("memory-"):  # memory-STRATEGY-VOCAB-SEQ[-ARCH], ARCH a memory_accuracy.TINY model
            _, strategy, vocab, seq, *arch = mode.split("-", 4)
            results[mode] = _memory(world, strategy, int(vocab), int(seq), arch[0] if arch else "tiny-llama")
        elif mode == "load":
            results[mode] = _load(world, Path(out))
        else:
            results[mode] = {"nf4": _nf4, "agree": _agree}[mode](world)
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(results))
    dist.barrier()
    close_world(world)


if __name__ == "__main__":
    main()
