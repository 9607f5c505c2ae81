"""Every LoRA variant and init on one real task and budget: trainable parameters, task metric, loss, speed, memory.

    .venv/bin/python bench/variants.py                  # ~25 minutes on 2 cores; bench/results/variants-cpu.*
    .venv/bin/python bench/variants.py --only lora vera # a subset (results not written)
    .venv/bin/python bench/variants.py --redo adalora   # rerun some rows into the committed results

The task is the main job's (recipes/smollm2-json.yaml): SmolLM2-135M-Instruct in NF4 with double
quantization, taught to answer a sentence about a person with one JSON object, 20 steps of 8 packed
128-token rows, paged 8-bit AdamW, cosine schedule. Every variant runs that recipe with its own
``lora.*`` overrides (rank 16 on all linears unless the row says otherwise) in a fresh process, so its
peak RSS is its own. Measured per variant:

- trainable parameters: the trainer's own count (its LoRA report, read off its log line);
- exact match: the share of the 48 held-out prompts whose greedy reply is exactly the right JSON, before
  and after training (the recipe's ``task``);
- eval loss after training (the held-out file's completion tokens);
- step time: seconds per optimizer step, from the trainer's tokens/s over the logged intervals;
- memory: the planner's predicted tensor peak for the run (what it plans on a GPU is the same model) and
  the process's peak RSS (interpreter, libraries and the bf16 model file read included).

Timings come from one run of this script, variant after variant on the same machine, so they compare
with each other; absolute numbers vary between machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import device_name, package_versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-json.yaml"
# name -> (what it is, recipe overrides)
VARIANTS = {
    "lora": ("LoRA (kaiming A, zero B)", []),
    "gaussian": ("LoRA, Gaussian A", ["lora.init=gaussian"]),
    "rslora": ("rsLoRA (alpha/sqrt(r))", ["lora.use_rslora=true"]),
    "dora": ("DoRA", ["lora.variant=dora"]),
    "lora+": ("LoRA+ (lr of B x16)", ["lora.loraplus_ratio=16"]),
    "lora-fa": ("LoRA-FA (A frozen)", ["lora.freeze_A=true"]),
    "pissa": ("PiSSA init", ["lora.init=pissa", "lora.pissa_niter=4"]),
    "olora": ("OLoRA init", ["lora.init=olora"]),
    "loftq": ("LoftQ init (1 iteration)", ["lora.init=loftq"]),
    "nonzero": ("nonzero init (both factors Gaussian)", ["lora.init=nonzero"]),
    "delta": ("Delta-LoRA (λ=1)", ["lora.variant=delta", "lora.delta_ratio=1.0"]),
    "vera": ("VeRA r=256, lr 1e-2", ["lora.variant=vera", "lora.rank=256", "optimizer.lr=1e-2"]),
    "adalora": ("AdaLoRA r 16 -> 8 on average", ["lora.variant=adalora", "lora.adalora_target_r=8",
                                                  "lora.adalora_tinit=2", "lora.adalora_tfinal=4",
                                                  "lora.adalora_delta_t=2"]),
    # PEFT's AdaLoRA init starts E at zero and A, B at N(0, 0.02), so at the recipe's lr 1e-3 the update
    # is still tiny after 20 steps; the row below gives it the lr VeRA gets.
    "adalora-lr": ("AdaLoRA r 16 -> 8 on average, lr 1e-2", ["lora.variant=adalora", "lora.adalora_target_r=8",
                                                             "lora.adalora_tinit=2", "lora.adalora_tfinal=4",
                                                             "lora.adalora_delta_t=2", "optimizer.lr=1e-2"]),
}
_TRAINABLE = re.compile(r"trainable: ([\d,]+) of")


def child(name: str, out: Path) -> dict:
    """One variant in this process: train, then the measurements (written as JSON by the caller)."""
    from qlora.train.loop import train
    from qlora.train.recipe import load_recipe

    found: list[int] = []

    class _Count(logging.Handler):
        def emit(self, record):
            m = _TRAINABLE.search(record.getMessage())
            if m:
                found.append(int(m.group(1).replace(",", "")))

    logging.getLogger("qlora").addHandler(_Count())
    logging.getLogger("qlora").setLevel(logging.INFO)
    recipe = load_recipe(RECIPE, VARIANTS[name][1] + [f"output_dir={out}"])
    t0 = time.perf_counter()
    res = train(recipe, say=lambda m: None, progress=False)
    wall = time.perf_counter() - t0
    if res.stopped != "done":
        raise RuntimeError(f"{name} stopped: {res.stopped}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "tok_per_s" in r]
    tokens_per_step = recipe.effective_batch_size * recipe.seq_len  # packed rows: every row is seq_len tokens
    tok_s = sum(r["tok_per_s"] for r in train_recs) / len(train_recs)
    (_, before), (_, after) = res.task_scores
    return {
        "variant": name, "what": VARIANTS[name][0], "overrides": VARIANTS[name][1], "trainable": found[-1],
        "exact_before": before.exact_match, "exact_after": after.exact_match, "n_prompts": after.n,
        "eval_loss_before": recs[0]["eval_loss"], "eval_loss_after": res.eval_losses[-1][1],
        "step_seconds": tokens_per_step / tok_s, "predicted_peak_bytes": train_recs[-1]["predicted_peak_bytes"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "wall_seconds": wall,
    }


def markdown(r: dict) -> str:
    lines = [f"# LoRA variants on one task and budget, {r['device']}", "",
             f"{r['date']}; {r['versions']}; `python bench/variants.py`. SmolLM2-135M-Instruct in NF4 + double "
             "quantization, the main job's recipe (recipes/smollm2-json.yaml: 20 steps, 8 x 128 tokens per step, "
             "paged 8-bit AdamW, lr 1e-3, rank 16 and alpha 32 on all linears unless the row says otherwise), "
             "each variant in its own process. Exact match: greedy replies to the 48 held-out prompts that are "
             "exactly the right JSON (0/48 before training for every variant but where noted). Memory: the "
             "planner's tensor peak, and the process's peak RSS.", "",
             "| variant | trainable params | exact match after | eval loss after | s/step | planned peak (MiB) "
             "| peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for v in r["rows"]:
        before = "" if v["exact_before"] == 0 else f" (before: {v['exact_before']:.0%})"
        lines.append(f"| {v['what']} | {v['trainable']:,} | {v['exact_after']:.1%}{before} | "
                     f"{v['eval_loss_after']:.3f} | {v['step_seconds']:.2f} | {v['predicted_peak_bytes'] / 2**20:.0f} "
                     f"| {v['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these variants only (nothing is written)")
    ap.add_argument("--redo", nargs="+", choices=list(VARIANTS),
                    help="rerun these variants and put them into the existing results (same machine only)")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, out = args.child
        print("RESULT " + json.dumps(child(name, Path(out))))
        return 0
    rows = []
    names = args.only or args.redo or list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            p = subprocess.run([sys.executable, __file__, "--child", name, str(Path(tmp) / name)],
                               capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"variant {name} failed (exit {p.returncode})")
            rows.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": device_name("cpu"), "date": datetime.date.today().isoformat(),
              "versions": package_versions("torch", "transformers", "bitsandbytes"), "rows": rows}
    if args.redo:
        old = json.loads((ROOT / "bench" / "results" / "variants-cpu.json").read_text())
        if old["device"] != result["device"]:
            raise SystemExit(f"--redo: the committed results are from {old['device']!r}, this is "
                             f"{result['device']!r}; timings would not compare. Run the whole script instead.")
        fresh = {r["variant"]: r for r in rows}
        kept = {r["variant"]: r for r in old["rows"]}
        result["rows"] = [fresh.get(n) or kept[n] for n in VARIANTS if n in fresh or n in kept]
        result["date"] = old["date"] + f"; {', '.join(fresh)} rerun {result['date']}"
    if args.only:
        print(markdown(result))
    else:
        write_results("variants-cpu", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
