"""Training on N processes (torchrun, gloo on the CPU): agreement with one process, speed, per-rank memory.

    .venv/bin/python bench/distributed.py            # ~2 minutes on 2 cores
    .venv/bin/python bench/distributed.py --quick    # fewer steps (a smoke run)

Writes bench/results/distributed-<device>.json and .md:

1. The tiny CPU recipe (float32, 4-layer Llama, seq 128, 8 sequences per step) trained by one process and by
   ``torchrun --nproc-per-node 2`` with ddp and with fsdp: per-step losses, the final adapters' relative
   difference, and tokens/s. On one 2-core machine the two ranks share the cores the single process has, so the
   speed column shows the cost of the collectives and of gloo, not what a second GPU would add.
2. One rank's live tensors at rest and over a training step (:func:`memcheck.check_rank`), ddp and fsdp, next to
   the planner's per-GPU prediction for the same settings.
3. Loading under fsdp (:func:`memcheck.check_load`): one rank's peak while a 16-layer checkpoint loads whole and
   with each layer sharded as it loads, next to the planner's ``load`` phase.
4. The planner on catalog models: per-GPU peaks for 1 GPU, ddp and fsdp on 2, and the fewest GPUs that fit.

Speed is a finding, not a test; the memory rows and the agreement are what tests/qlora/test_parallel.py checks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import device_name, package_versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
RUN = ["seq_len=128", "micro_batch_size=2", "effective_batch_size=8", "eval_steps=1000", "save_steps=1000",
       "lora.rank=8", "lora.dropout=0.0", "data.eval_fraction=0.02", "optimizer.name=adamw", "optimizer.lr=1e-3",
       "model.dtype=float32", "quant.compute_dtype=float32", "lora.dtype=float32", "device=cpu"]
MEMORY_ROWS = [("ddp", 8192, 256, "tiny-llama"), ("fsdp", 8192, 256, "tiny-llama"), ("ddp", 512, 2048, "tiny-llama"),
               ("fsdp", 512, 2048, "tiny-llama"), ("fsdp", 8192, 256, "tiny-qwen2"), ("fsdp", 512, 2048, "tiny-qwen2")]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}")


def _train(out: Path, steps: int, ranks: int, strategy: str | None) -> list[dict]:
    args = [str(TINY), *RUN, f"max_steps={steps}", f"output_dir={out}", "--no-progress"]
    if strategy:
        args.insert(1, f"distributed.strategy={strategy}")
    if ranks == 1:
        cmd, env = [sys.executable, "-m", "qlora.cli", "train", *args], dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "qlora.cli", "train", *args]
        env = _env()
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _rel(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    num = sum(((x[k] - y[k]).double() ** 2).sum() for k in x) ** 0.5
    return float(num / sum((x[k].double() ** 2).sum() for k in x) ** 0.5)


def _agreement(steps: int, tmp: Path) -> dict:
    rows = {}
    for label, ranks, strategy in (("1 process", 1, None), ("2 ranks, ddp", 2, "ddp"), ("2 ranks, fsdp", 2, "fsdp")):
        recs = _train(tmp / label.replace(" ", "_").replace(",", ""), steps, ranks, strategy)
        train = [r for r in recs if "loss" in r]
        rows[label] = {"losses": [r["loss"] for r in train],
                       "tok_per_s": sorted(r["tok_per_s"] for r in train[1:])[len(train[1:]) // 2]}
    one = tmp / "1_process"
    for label in ("2 ranks, ddp", "2 ranks, fsdp"):
        rows[label]["adapter_rel_diff"] = _rel(tmp / label.replace(" ", "_").replace(",", ""), one)
    return rows


def _memory(tmp: Path) -> list[dict]:
    out = []
    for strategy, vocab, seq, arch in MEMORY_ROWS:
        d = tmp / f"mem-{strategy}-{vocab}-{seq}-{arch}"
        d.mkdir()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--worker", strategy, str(vocab), str(seq), arch, str(d)],
                       check=True, capture_output=True, text=True, env=_env(), cwd=ROOT)
        out.extend(json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1))
    return out


def _worker(strategy: str, vocab: int, seq: int, arch: str, out: Path) -> None:
    import memcheck
    import torch
    from memory_accuracy import TINY as CONFIGS

    from qlora.train.parallel import close_world, init_world

    world, _ = init_world(torch.device("cpu"), "gloo", 120)
    got = memcheck.check_rank(world, strategy, dict(CONFIGS[arch], vocab_size=vocab), 1, seq)
    row = {"strategy": strategy, "model": arch, "vocab": vocab, "seq": seq, "rank": world.rank, "at_rest": got.at_rest,
           "predicted_at_rest": got.predicted_at_rest, "peak": got.peak, "predicted_peak": got.predicted_peak,
           "phase": got.footprint.peak_phase, "fsdp_gathered": got.footprint.breakdown.get("fsdp_gathered", 0)}
    (out / f"rank{world.rank}.json").write_text(json.dumps(row))
    close_world(world)


def _load(tmp: Path) -> list[dict]:
    d = tmp / "load"
    d.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, "--load-worker", str(d)],
                   check=True, capture_output=True, text=True, env=_env(), cwd=ROOT)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]


def _load_worker(out: Path) -> None:
    import memcheck
    import torch

    from qlora.train.parallel import close_world, init_world

    world, _ = init_world(torch.device("cpu"), "gloo", 120)
    row = dict(memcheck.check_load(world, out / "ckpt"), rank=world.rank)
    (out / f"rank{world.rank}.json").write_text(json.dumps(row))
    close_world(world)


def _planner() -> list[dict]:
    import memory

    rows = []
    base = memory.Settings(seq_len=2048, micro_batch_size=1, rank=16, optimizer="adamw")
    for model, gpu in (("llama-3.1-8b", "24GB"), ("llama-3.1-70b", "24GB"), ("llama-3.1-70b", "48GB"),
                       ("llama-3.1-70b", "80GB")):
        for label, change in (("1 GPU", {}), ("2 GPUs, ddp", dict(gpus=2, strategy="ddp")),
                              ("2 GPUs, fsdp", dict(gpus=2, strategy="fsdp", offload_params=False)),
                              ("2 GPUs, fsdp + offload_params", dict(gpus=2, strategy="fsdp", offload_params=True)),
                              ("gpus auto", dict(gpus="auto"))):
            p = memory.plan(gpu, model, base.changed(**change))
            fp = p.footprint
            rows.append({"model": model, "gpu": gpu, "setting": label, "fits": p.fits, "gpus": fp.gpus,
                         "strategy": fp.strategy, "offload_params": fp.offload_params,
                         "peak_gib": round(p.peak_bytes / 2**30, 2), "usable_gib": round(p.usable_bytes / 2**30, 2),
                         "host_gib": round(fp.host.total_bytes / 2**30, 2),
                         "load_gib": round(fp.phases["load"] / 2**30, 2) if "load" in fp.phases else None})
    return rows


def markdown(r: dict) -> str:
    lines = [f"# Training on 2 processes, {r['device']}", "", f"{r['date']}; {r['versions']}; "
             f"`{r['command']}`. Written by bench/distributed.py.", "",
             "## Agreement with one process and speed", "",
             "Tiny CPU recipe (4-layer Llama, float32), 8 sequences of 128 tokens per step, "
             f"{r['steps']} steps. 2 ranks share this machine's 2 cores with the one process: the speed column is "
             "the collectives' and gloo's cost, not a second GPU's gain.", "",
             "| run | final loss | max relative loss difference vs 1 process | adapter relative difference | "
             "tokens/s (median) |", "|---|---|---|---|---|"]
    one = r["agreement"]["1 process"]["losses"]
    for label, row in r["agreement"].items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], one))
        rel = row.get("adapter_rel_diff")
        lines.append(f"| {label} | {row['losses'][-1]:.6f} | {diff:.1e} | {'-' if rel is None else f'{rel:.1e}'} | "
                     f"{row['tok_per_s']:,.0f} |")
    lines += ["", "## One rank's memory against the planner", "",
              "Live tensors of one rank (memory.tracker, FSDP2's storage resizes included) over one training step "
              "of a 3-layer 128-hidden model (tiny-llama; tiny-qwen2 ties its head to the embedding), batch 1, "
              "rank 8, AdamW, chunked loss, next to `memory.estimate` with `gpus=2` for the same settings.", "",
              "| strategy | model | vocab | seq | rank | at rest, measured | predicted | error | step peak, measured | "
              "predicted | error | peak phase |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["memory"]:
        e1 = (m["predicted_at_rest"] - m["at_rest"]) / m["at_rest"]
        e2 = (m["predicted_peak"] - m["peak"]) / m["peak"]
        lines.append(f"| {m['strategy']} | {m['model']} | {m['vocab']} | {m['seq']} | {m['rank']} | "
                     f"{m['at_rest'] / 2**20:.3f} MiB | "
                     f"{m['predicted_at_rest'] / 2**20:.3f} MiB | {e1:+.2%} | {m['peak'] / 2**20:.2f} MiB | "
                     f"{m['predicted_peak'] / 2**20:.2f} MiB | {e2:+.2%} | {m['phase']} |")
    lines += ["", "DDP's at-rest figures leave out its gradient buckets on both sides (they live inside DDP's reducer, "
              "out of reach of a parameter walk); the step peak includes them.", "",
              "## Loading under fsdp", "",
              "One rank's live tensors at the peak of `qlora.train.build.build_model` for a 16-layer Llama checkpoint "
              "(hidden 64, bf16, LoRA r=8 on all linears): as one process loads it (the whole base), and with FSDP2 "
              "sharding each layer as it loads, next to the planner's `load` phase for the sharded one.", "",
              "| rank | whole base (4-bit) | peak, whole load | peak, sharded load | predicted | error |",
              "|---|---|---|---|---|---|"]
    for m in r["load"]:
        lines.append(f"| {m['rank']} | {m['base'] / 2**10:.1f} KiB | {m['whole'] / 2**10:.1f} KiB | "
                     f"{m['sharded'] / 2**10:.1f} KiB | {m['predicted'] / 2**10:.1f} KiB | "
                     f"{(m['predicted'] - m['sharded']) / m['sharded']:+.2%} |")
    lines += ["",
              "## The planner per GPU (seq 2048, micro-batch 1, rank 16 on all linears, AdamW)", "",
              "| model | GPU | setting | fits | GPUs | strategy | offload_params | per-GPU peak GiB | usable GiB | "
              "host GiB per process | per-GPU while loading GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["planner"]:
        load = "-" if p["load_gib"] is None else f"{p['load_gib']:.2f}"
        lines.append(f"| {p['model']} | {p['gpu']} | {p['setting']} | {'yes' if p['fits'] else 'no'} | {p['gpus']} | "
                     f"{p['strategy']} | {'on' if p['offload_params'] else 'off'} | {p['peak_gib']:.2f} | "
                     f"{p['usable_gib']:.2f} | {p['host_gib']:.2f} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 steps instead of 12")
    ap.add_argument("--worker", nargs=5, metavar=("STRATEGY", "VOCAB", "SEQ", "ARCH", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--load-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_worker:
        _load_worker(Path(args.load_worker))
        return 0
    if args.worker:
        strategy, vocab, seq, arch, out = args.worker
        _worker(strategy, int(vocab), int(seq), arch, Path(out))
        return 0
    steps = 3 if args.quick else 12
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        result = {"device": device_name("cpu"), "date": datetime.date.today().isoformat(),
                  "versions": ", ".join(f"{k} {v}" for k, v in package_versions("torch", "transformers").items()),
                  "command": "python bench/distributed.py" + (" --quick" if args.quick else ""), "steps": steps,
                  "agreement": _agreement(steps, tmp), "memory": _memory(tmp), "load": _load(tmp),
                  "planner": _planner()}
    write_results("distributed-cpu", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
