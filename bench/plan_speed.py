"""How fast the planner answers: `qlora plan` cold and cached, 1,000 estimates, a trainer's start.

    .venv/bin/python bench/plan_speed.py            # ~1-2 minutes on 2 cores
    .venv/bin/python bench/plan_speed.py --quick    # fewer repeats (a smoke run)

Writes bench/results/plan-speed-<device>.json and .md. Every timing is the
wall clock of a fresh process (what a user waits for), median and min of
N runs, so the interpreter's start and every import are included:

1. ``qlora plan --gpu 24GB`` (Llama-3.1-8B, the default), cold: an empty
   ``$QLORA_CACHE`` for each run, so the answer comes from the profiles
   shipped with qlora; and cached: the same with the user cache filled.
2. The same for a model outside the catalog (a config.json: SmolLM2 with 6
   layers): cold means fitting its profile (torch and transformers are
   imported and the model is dry-run), cached means reading it back.
3. ``import memory`` in a script: 1,000 ``memory.estimate`` calls over
   (batch, seq, rank) for one model, after the first call.
4. What ``qlora train`` pays to plan at start: ``plan_recipe`` on the tiny
   CPU recipe after the imports a trainer has done anyway, cache warm.

Timings are findings, not pass/fail tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import device_name, package_versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QLORA = [sys.executable, "-m", "qlora.cli"]

_ESTIMATES = """
import itertools, sys, time
import memory
spec = memory.load_spec("llama-3.1-8b")
memory.estimate(spec)
shapes = list(itertools.product([1, 2, 3, 4, 6, 8, 12, 16, 24, 32], [512, 1024, 2048, 4096, 8192,
              16384, 32768, 65536, 100000, 131072], [8, 16, 32, 64, 128, 256, 4, 12, 24, 48]))
assert len(shapes) == 1000
start = time.perf_counter()
for b, s, r in shapes:
    memory.estimate(spec, micro_batch_size=b, seq_len=s, rank=r)
print(time.perf_counter() - start, "torch" in sys.modules)
"""

_TRAIN_START = """
import sys, time
import torch, transformers, memory  # a trainer has imported these before it plans
from qlora.train.plan import plan_recipe
from qlora.train.recipe import load_recipe
recipe = load_recipe("recipes/tiny-cpu.yaml")
plan_recipe(recipe)  # fills the cache
from memory import profile, spec
spec._spec_cached.cache_clear(); profile.body_profile.cache_clear()  # a new process: disk cache only
start = time.perf_counter()
plan_recipe(recipe)
print(time.perf_counter() - start)
"""


def _wall(cmd: list[str], env: dict, check_rc=(0,)) -> float:
    start = time.perf_counter()
    rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
    elapsed = time.perf_counter() - start
    if rc not in check_rc:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}")
    return elapsed


def _stats(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3), "runs": len(values)}


def _plan_times(args: list[str], repeats: int, tmp: Path, label: str) -> dict:
    """Cold (empty user cache per run) and cached wall times of ``qlora plan ARGS``."""
    cold = []
    for i in range(repeats):
        env = dict(os.environ, QLORA_CACHE=str(tmp / f"{label}-cold-{i}"))
        cold.append(_wall(QLORA + ["plan"] + args, env))
    env = dict(os.environ, QLORA_CACHE=str(tmp / f"{label}-warm"))
    _wall(QLORA + ["plan"] + args, env)
    cached = [_wall(QLORA + ["plan"] + args, env) for _ in range(repeats)]
    return {"command": "qlora plan " + " ".join(args), "cold": _stats(cold), "cached": _stats(cached)}


def _python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return out.stdout.strip()


def run(quick: bool) -> dict:
    repeats = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        custom = tmp / "custom-model"
        custom.mkdir()
        cfg = json.loads((ROOT / "qlora" / "assets" / "smollm2-135m" / "config.json").read_text())
        cfg["num_hidden_layers"] = 6
        (custom / "config.json").write_text(json.dumps(cfg))
        catalog = _plan_times(["--gpu", "24GB"], repeats, tmp, "catalog")
        outside = _plan_times(["--gpu", "24GB", "--model", str(custom)], max(2, repeats // 2), tmp, "custom")
        env = dict(os.environ, QLORA_CACHE=str(tmp / "catalog-warm"))
        est = [_python(_ESTIMATES, env).split() for _ in range(max(2, repeats // 2))]
        train = [float(_python(_TRAIN_START, dict(os.environ, QLORA_CACHE=str(tmp / "train")))) for _ in range(2)]
    return {
        "device": device_name("cpu"),
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "versions": package_versions("torch", "transformers", "rich"),
        "plan_catalog": catalog,
        "plan_outside_catalog": outside,
        "estimates_1000": {**_stats([float(t) for t, _ in est]), "torch_imported": any(x == "True" for _, x in est)},
        "train_start_plan": _stats(train),
    }


def markdown(r: dict) -> str:
    c, o, e, t = r["plan_catalog"], r["plan_outside_catalog"], r["estimates_1000"], r["train_start_plan"]
    row = lambda what, s, target: f"| {what} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['runs']} | {target} |"  # noqa: E731
    return "\n".join([
        f"# Planner speed ({r['device']}, {r['date']})",
        "",
        "Wall clock of a fresh process each run (interpreter start and imports included). "
        f"Produced by `.venv/bin/python bench/plan_speed.py`; versions {r['versions']}.",
        "",
        "| what | median s | min s | runs | target |",
        "|---|---:|---:|---:|---|",
        row(f"`{c['command']}` cold (empty cache: shipped profile)", c["cold"], "<= 1.0 s"),
        row(f"`{c['command']}` cached", c["cached"], "<= 0.3 s"),
        row("same, a model outside the catalog, cold (fits its profile)", o["cold"], "(seconds: dry runs)"),
        row("same, a model outside the catalog, cached", o["cached"], "<= 0.3 s"),
        row("1,000 `memory.estimate` calls after the first (in-process)", e, "<= 2 s"),
        row("`plan_recipe` at a trainer's start, cache warm (in-process)", t, "no more than a cached plan"),
        "",
        f"torch imported by the 1,000 estimates: {e['torch_imported']}.",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    r = run(args.quick)
    write_results("plan-speed-cpu", r, markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
