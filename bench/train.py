"""Train the same work with the standard HF stack and with qlora in one command; print qlora/baseline ratios.

    .venv/bin/python bench/train.py                       # --mode cpu: 4-layer 512-hidden Llama, minutes on 2 cores
    .venv/bin/python bench/train.py --mode cuda           # Llama-3.1-8B architecture, seq 2048, batch 1 and 4
    .venv/bin/python bench/train.py --mode max-context    # longest seq at batch 1 under a 24 GiB cap, per stack
    # the 8B random checkpoint is 16 GB: --checkpoint-dir DIR writes it once and reuses it across commands
    .venv/bin/python bench/train.py --tiny --results-dir /tmp/x   # seconds: the CI smoke size (any mode, on the CPU)
    # on a lent GPU: --budget-min 9 stops starting stacks before a 10-minute command limit;
    # results are written after each

Stacks, each trained in its own subprocess by bench/train_stacks.py (so host
RSS and CUDA peaks never mix, and a failed OOM probe cannot poison the next):

* ``hf``: the baseline, as users run it. transformers ``from_pretrained`` with
  ``BitsAndBytesConfig`` (NF4, double quantization, bf16 compute), SDPA
  attention, ``peft.prepare_model_for_kbit_training`` (which casts every
  non-4-bit parameter to fp32 and turns on non-reentrant checkpointing), PEFT
  LoRA, ``model(input_ids, labels=...)`` (transformers' loss), a plain loop.
* ``hf-no-upcast``: the same minus the fp32 cast (freeze + the same
  checkpointing call ``prepare_model_for_kbit_training`` makes): what the
  upcast costs, the "no silent upcasts" comparison.
* ``qlora``: ``quant.load_quantized_model`` + ``qlora.lora.surgery.apply_lora`` +
  ``qlora.train.setup.enable_checkpointing`` + ``qlora.train.loss.forward_loss``
  (chunked cross-entropy, 1,024 tokens per chunk).
* ``qlora-offload``: the same with ``offload_activations`` (checkpointed layer
  inputs in pinned host memory; a no-op move on the CPU, so not run there by default).
* ``qlora-long``: ``qlora-offload`` plus the tiled MLP and norms (``layers.tiling``,
  ``--tile-tokens`` per tile): the levers of ``recipes/llama-3.1-8b-128k-24gb.yaml``.
* ``qlora-long-mlp``: ``qlora-long`` without the tiled norms (what each tiling lever costs).
* ``qlora-unchunked``: qlora with transformers' loss on full fp32 logits
  (``forward_loss(chunk_tokens=None)``): what the chunked loss saves and costs.

Same for all: the checkpoint (random weights of a real architecture, written
once; values change neither speed nor memory), the data (random token ids,
every token a target), sequence length, micro-batch, LoRA rank/alpha/dropout
on all linear layers, the optimizer (bitsandbytes paged AdamW 8-bit, lr
2e-4), bf16 autocast and the number of steps. Left at each stack's default
and recorded: adapter dtype (PEFT fp32, qlora bf16; ``--qlora-adapter-dtype``).

Measured per stack: tokens/s over steps 3..N (steps 1-2 build optimizer state
and warm caches), peak memory (CUDA: ``max_memory_allocated`` and
``max_memory_reserved`` over the training steps; CPU: peak RSS sampled every
5 ms during the steps, also above the post-import baseline), and the final
loss. ``--repeats N`` runs every stack N times, interleaved, and counts each
stack's best speed (the least disturbed run on a shared machine) and largest
peak. Results: bench/results/train-<mode>.json and .md (device, versions,
date, command). Speed and memory are findings, not pass/fail tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import device_name, package_versions  # bench/ siblings: the script's folder is on the path
from _search import search_longest  # noqa: F401  (re-exported for tests)

from qlora.train.loss import CHUNK_TOKENS
from qlora.train.optim import OPTIMIZERS

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
STACKS = ("hf", "hf-no-upcast", "qlora", "qlora-offload", "qlora-long", "qlora-long-mlp", "qlora-unchunked")
BASELINE = "hf"

# Architectures (random weights). The CPU model keeps Llama-3's shape ratios
# (GQA 4:1, MLP 3.5x) at a size 2 cores train in seconds per step.
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
    "cpu-llama-4x512": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}
MODES = {
    "cpu": dict(model="cpu-llama-4x512", device="cpu", seq_len=1024, batches=[2], steps=5, repeats=2,
                stacks=["hf", "hf-no-upcast", "qlora", "qlora-unchunked"]),
    "cuda": dict(model="llama-3.1-8b", device="cuda", seq_len=2048, batches=[1, 4], steps=10,
                 stacks=["hf", "hf-no-upcast", "qlora", "qlora-offload", "qlora-unchunked"]),
    # qlora-long first: the long-context recipe's levers, in case a short lease cuts the rest
    "max-context": dict(model="llama-3.1-8b", device="cuda", seq_len=None, batches=[1], steps=2,
                        stacks=["qlora-long", "hf", "qlora-offload", "qlora"]),
}
# --tiny runs any mode on the CPU in seconds (CI); max-context then uses a simulated cap (train_stacks._simulated_cap).
TINY = dict(model="tiny", device="cpu", seq_len=64, batches=[2], steps=4, repeats=1)


# ---- the shared checkpoint ---------------------------------------------------------


def make_checkpoint(path: Path, arch: dict, seed: int = 0, shard_bytes: int = 2 << 30) -> dict:
    """Write a random-weight bf16 Llama checkpoint of ``arch`` to ``path`` (sharded safetensors).

    Weights are N(0, 0.02), norm weights 1 (so activations stay in range);
    tensors are drawn one at a time (on the GPU when there is one: 8B values
    are slow to draw on a CPU), so host memory peaks near one shard.

    Returns:
        Facts about it: params, bytes, tensors.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**arch, tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg.dtype = torch.bfloat16
    with init_empty_weights():
        shapes = {k: v.shape
                  for k, v in AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    groups, cur, cur_bytes = [], [], 0  # shard membership first, so each shard is drawn, written and freed in turn
    for k, shape in shapes.items():
        cur.append(k)
        cur_bytes += shape.numel() * 2
        if cur_bytes >= shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        groups.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        shard = {}
        for k in keys:
            if k.endswith("norm.weight"):
                shard[k] = torch.ones(shapes[k], dtype=torch.bfloat16)
            else:
                shard[k] = (torch.randn(shapes[k], generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.nbytes for t in shard.values())
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.save_pretrained(str(path))
    return dict(params=sum(s.numel() for s in shapes.values()), checkpoint_bytes=total, tensors=len(shapes))


class Budget:
    """Wall-clock budget for the whole command (a lent GPU runs one command for at most 10 minutes).

    Past the deadline no further child starts; a running child gets what is
    left as its timeout. Results written so far stay valid.
    """

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60 * max(0.0, minutes)

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def spent(self) -> bool:
        return self.end is not None and self.left() < 5


class ChildFailed(RuntimeError):
    """A stack's process failed or was stopped; ``partial`` holds the batches it finished first."""

    def __init__(self, message: str, partial: list[dict]):
        super().__init__(message)
        self.partial = partial


def _json_lines(text: str | bytes | None) -> list[dict]:
    if isinstance(text, bytes):  # TimeoutExpired carries bytes even for text=True
        text = text.decode(errors="replace")
    return [json.loads(ln) for ln in (text or "").splitlines() if ln.startswith("{")]


def run_child(spec: dict, budget: Budget | None = None) -> dict:
    """Build and train one stack as ``spec`` says in a fresh Python process (bench/train_stacks.py); its output.

    Raises:
        ChildFailed: the child failed (its exit code and the end of its stderr) or ran past the budget;
            carries the batches it finished before that.
    """
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # bitsandbytes' CPU kernels use OpenMP too
    timeout = budget.left() if budget is not None else None
    try:
        p = subprocess.run([sys.executable, str(ROOT / "train_stacks.py"), json.dumps(spec)], capture_output=True,
                           text=True, env=env, timeout=None if timeout is None else max(1.0, timeout))
    except subprocess.TimeoutExpired as e:
        partial = [ln["partial_run"] for ln in _json_lines(e.stdout) if "partial_run" in ln]
        raise ChildFailed(f"stack {spec['stack']} was stopped at the time budget "
                          f"({timeout:.0f} s left when it started)", partial) from None
    lines = _json_lines(p.stdout)
    final = [ln for ln in lines if "partial_run" not in ln]
    if p.returncode != 0 or not final:
        raise ChildFailed(f"stack {spec['stack']} failed with exit code {p.returncode}:\n{p.stderr[-4000:]}",
                          [ln["partial_run"] for ln in lines if "partial_run" in ln])
    return final[-1]


# ---- modes ---------------------------------------------------------------------------


def _gib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


SPEEDS = ("tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step", "tokens_per_cpu_s")
MEMORY = ("peak_rss", "peak_rss_above_imports", "peak_rss_anon", "rss_setup",
          "cuda_max_allocated", "cuda_max_reserved", "cuda_allocated_setup")


def _failed(stack: str, batch: int, seq_len: int, error: str) -> dict:
    return dict(stack=stack, batch=batch, seq_len=seq_len, ok=False, oom=False, error=error, step_s=[], losses=[],
                final_loss=None, trainable_params=None, model_bytes_by_dtype={}, **{k: None for k in SPEEDS})


def train_runs(base: dict, stacks: list[str], batches: list[int], repeats: int, budget: Budget,
               on_result: Callable[[list[dict]], None] = lambda runs: None) -> list[dict]:
    """Every stack x batch, ``repeats`` times, interleaved (a slow spell on a shared machine hits every stack).

    On CUDA one process per stack trains all batch sizes, smallest first,
    with the peak counters reset in between (each load of an 8B model costs
    tens of seconds of short device time); on the CPU each batch size gets
    its own process, since a process's resident memory never shrinks back.
    A stack that fails or runs past the budget is recorded with its error;
    the others still run. ``on_result`` gets the runs so far after each child.
    """
    runs: list[dict] = []
    groups = [sorted(batches)] if base["device"] == "cuda" else [[b] for b in batches]
    for rep in range(repeats):
        for group in groups:
            for stack in stacks:
                if budget.spent():
                    runs += [dict(_failed(stack, b, base["seq_len"], "not run: time budget spent"), repeat=rep + 1)
                             for b in group]
                    continue
                try:
                    out = run_child(dict(base, stack=stack, batches=group), budget)["runs"]
                except ChildFailed as e:
                    print(f"  run {rep + 1} {stack}: FAILED\n{e}", flush=True)
                    done = {r["batch"] for r in e.partial}
                    out = e.partial + [_failed(stack, b, base["seq_len"], str(e)[-2000:])
                                       for b in group if b not in done]
                for r in out:
                    runs.append(dict(r, repeat=rep + 1))
                    if r.get("error"):
                        continue
                    if base["device"] == "cuda":
                        mem = f"max allocated {_gib(r['cuda_max_allocated'])}, reserved {_gib(r['cuda_max_reserved'])}"
                    else:
                        mem = f"peak RSS {_gib(r['peak_rss'])} (+{_gib(r['peak_rss_above_imports'])} above imports)"
                    tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
                    print(f"  run {rep + 1} b={r['batch']} seq={base['seq_len']} {stack:14s} "
                          f"{'ok ' if r['ok'] else 'OOM' if r['oom'] else 'bad'} {tps:>8s} tok/s  {mem}  "
                          f"final loss {r['final_loss']}", flush=True)
                on_result(runs)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per stack x batch over its repeats: the best speed (the least disturbed run), the largest peak,
    the final loss."""
    out = []
    for key in dict.fromkeys((r["batch"], r["stack"]) for r in runs):
        rs = [r for r in runs if (r["batch"], r["stack"]) == key]
        ok = all(r["ok"] for r in rs)
        first = next((r for r in rs if not r.get("error")), rs[0])
        row = dict(batch=key[0], stack=key[1], seq_len=rs[0]["seq_len"], repeats=len(rs), ok=ok,
                   oom=any(r["oom"] for r in rs), error=next((r["error"] for r in rs if r.get("error")), None),
                   final_loss=first["final_loss"], final_losses=[r["final_loss"] for r in rs],
                   trainable_params=first["trainable_params"], model_bytes_by_dtype=first["model_bytes_by_dtype"])
        for k in SPEEDS:
            row[k] = max(r[k] for r in rs) if ok else None
        for k in MEMORY:
            if all(k in r for r in rs):
                row[k] = max(r[k] for r in rs)
        out.append(row)
    return out


def ratios(summary: list[dict], device: str) -> list[dict]:
    """qlora-family / baseline and hf-no-upcast / hf for each batch size (> 1 speed is faster,
    < 1 memory is smaller)."""
    mem_keys = (("cuda_max_allocated", "cuda_max_reserved") if device == "cuda"
                else ("peak_rss", "peak_rss_above_imports", "peak_rss_anon"))
    out = []
    for batch in sorted({r["batch"] for r in summary}):
        by = {r["stack"]: r for r in summary if r["batch"] == batch}
        pairs = [(s, BASELINE) for s in ("qlora", "qlora-offload", "qlora-unchunked", "hf-no-upcast") if s in by]
        pairs += [(s, "hf-no-upcast") for s in ("qlora",) if s in by and "hf-no-upcast" in by]
        pairs += [(s, "qlora-unchunked") for s in ("qlora",) if s in by and "qlora-unchunked" in by]
        for a, b in pairs:
            if b not in by or not (by[a]["ok"] and by[b]["ok"]):
                continue
            row = dict(batch=batch, stack=a, vs=b, final_loss=(by[a]["final_loss"], by[b]["final_loss"]))
            for k in SPEEDS + mem_keys:
                row[k] = by[a][k] / by[b][k]
            out.append(row)
    return out


def max_context(base: dict, stacks: list[str], start: int, max_seq: int, resolution: int, budget: Budget,
                on_result: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Longest trainable sequence per stack at batch 1 under ``base['cap_bytes']``.

    One process per stack loads the model once and searches in place (see
    bench/_search.py: doubling from ``start``, then probes placed by the
    measured memory slope, then bisection to ``resolution``); a probe is one
    training step after a short warm-up step has created optimizer state.
    Because an out-of-memory in one probe can leave the allocator
    fragmented, the answer is then confirmed in a fresh process that trains
    ``base['steps']`` steps at that length, stepping down by ``resolution``
    (at most three times) if it does not fit there.
    """
    out = []
    for stack in stacks:
        row = dict(stack=stack, max_seq_len=0, first_failure=None, hit_search_cap=False, probes=[], confirmed=[])
        out.append(row)
        if budget.spent():
            row["error"] = "not run: time budget spent"
            continue
        try:
            found = run_child(dict(base, stack=stack, batches=[1],
                                   search=dict(start=start, max_seq=max_seq, resolution=resolution, probe_steps=1)),
                              budget)
            row.update(probes=found["probes"], first_failure=found["first_failure"],
                       hit_search_cap=found["first_failure"] is None, search_max_seq_len=found["max_seq_len"])
            seq = found["max_seq_len"]
            for p in found["probes"]:
                peak = f"max reserved {_gib(p['cuda_max_reserved'])}, " if p.get("cuda_max_reserved") else (
                    f"simulated peak {_gib(p['simulated_peak'])}, " if p.get("simulated_peak") else "")
                print(f"  {stack:14s} seq {p['seq_len']:>7d}: {'fits' if p['ok'] else 'OOM'}  ({peak}{p['seconds']} s)",
                      flush=True)
            while seq > 0 and len(row["confirmed"]) < 4 and not budget.spent():
                r = run_child(dict(base, stack=stack, batches=[1], seq_len=seq), budget)["runs"][0]
                row["confirmed"].append(dict(seq_len=seq, ok=r["ok"], oom=r["oom"],
                                             cuda_max_allocated=r.get("cuda_max_allocated"),
                                             cuda_max_reserved=r.get("cuda_max_reserved"),
                                             simulated_peak=r.get("simulated_peak")))
                print(f"  {stack:14s} seq {seq:>7d} in a fresh process, {base['steps']} steps: "
                      f"{'fits' if r['ok'] else 'OOM'}", flush=True)
                if r["ok"]:
                    row["max_seq_len"] = seq
                    break
                if not r["oom"]:
                    raise RuntimeError(f"{stack} at seq {seq} produced a non-finite loss; not a memory limit")
                seq -= resolution
            if not row["max_seq_len"]:  # never a silent 0: say why nothing was confirmed
                why = ("time budget spent" if budget.spent()
                       else f"{len(row['confirmed'])} fresh-process runs ran out of memory")
                row["error"] = f"unconfirmed: the search found {found['max_seq_len']:,} tokens, but {why}"
        except RuntimeError as e:  # ChildFailed, or a non-finite loss in the confirmation
            print(f"  {stack}: FAILED\n{e}", flush=True)
            row["error"] = str(e)[-2000:]
        on_result(out)
    return out


# ---- report ---------------------------------------------------------------------------


def write_markdown(path: Path, res: dict) -> None:
    s, m = res["settings"], res["model"]
    cuda = res["device"] == "cuda"
    L = [f"# Training benchmark ({res['mode']}): qlora vs transformers + PEFT + bitsandbytes", "",
         f"Device: {res['device_name']}. Date {res['date']}; command `{res['command']}`; "
         f"torch threads {res['torch_threads']}.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
         f"Model: Llama architecture `{m['name']}` with random weights ({m['params'] / 1e6:.1f} M params: "
         f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
         f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV, vocab {m['vocab_size']}). "
         f"LoRA r={s['rank']}, alpha={s['alpha']:g}, dropout {s['dropout']:g} on all linear layers; "
         f"optimizer {s['optimizer']} lr {s['lr']:g}; bf16 autocast; random token ids, every token a target; "
         f"adapters: PEFT fp32 (its default), qlora {s['qlora_adapter_dtype']}; "
         f"qlora loss chunk {s['chunk_tokens']} tokens.", ""]
    if res.get("summary"):
        mem_head = ("max allocated | max reserved | allocated after setup" if cuda
                    else "peak RSS | peak RSS above imports | peak anon RSS")
        speed = (["tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step"]
                 + ([] if cuda else ["tokens_per_cpu_s"]))
        speed_head = ("tokens/s | tokens/s (median step) | tokens/s (best step)"
                      + ("" if cuda else " | tokens per CPU-second"))
        L += [f"## Per stack ({s['steps']} steps per run, speed over steps 3..{s['steps']}; "
              f"best speed and largest peak over {s['repeats']} run(s))", "",
              f"| stack | batch x seq | {speed_head} | {mem_head} | final loss | trainable params | "
              "params+buffers by dtype |",
              "|---|---|" + "---:|" * (len(speed) + 5) + "---|"]
        for r in res["summary"]:
            mem = [r.get(k, 0) for k in (("cuda_max_allocated", "cuda_max_reserved", "cuda_allocated_setup") if cuda
                                         else ("peak_rss", "peak_rss_above_imports", "peak_rss_anon"))]
            dt = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(r["model_bytes_by_dtype"].items()))
            tps = " | ".join(f"{r[k]:.1f}" if r[k] else ("OOM" if r["oom"] else "-") for k in speed)
            loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
            params = f"{r['trainable_params']:,}" if r["trainable_params"] else "-"
            if r.get("error"):
                tps = " | ".join(["FAILED"] + ["-"] * (len(speed) - 1))
            L.append(f"| {r['stack']} | {r['batch']} x {r['seq_len']} | {tps} | "
                     + " | ".join(_gib(x or 0) for x in mem) + f" | {loss} | {params} | {dt} |")
        k = "cuda_max_allocated" if cuda else "peak_rss"
        L += ["", "All runs (tokens/s over steps 3..N; step seconds; peak):", "",
              "| run | stack | batch | tokens/s | step seconds | peak |", "|---|---|---|---:|---|---:|"]
        for r in res["runs"]:
            tps = (f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"]
                   else ("OOM" if r["oom"] else "FAILED" if r.get("error") else "-"))
            L.append(f"| {r['repeat']} | {r['stack']} | {r['batch']} | {tps} | "
                     f"{', '.join(f'{t:.2f}' for t in r['step_s'])} | {_gib(r.get(k) or 0)} |")
    if res.get("ratios"):
        mems = [("cuda_max_allocated", "max allocated"), ("cuda_max_reserved", "max reserved")] if cuda else [
            ("peak_rss", "peak RSS"), ("peak_rss_above_imports", "peak RSS above imports"),
            ("peak_rss_anon", "peak anon RSS")]
        speed = (["tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step"]
                 + ([] if cuda else ["tokens_per_cpu_s"]))
        speed_head = ("tokens/s | tokens/s (median step) | tokens/s (best step)"
                      + ("" if cuda else " | tokens per CPU-second"))
        L += ["", "## Ratios (speed: > 1 is faster; memory: < 1 is smaller)", "",
              f"| batch | stack / baseline | {speed_head} | " + " | ".join(n for _, n in mems)
              + " | final loss (stack, baseline) |",
              "|---|---|" + "---:|" * (len(speed) + len(mems)) + "---|"]
        for q in res["ratios"]:
            L.append(f"| {q['batch']} | {q['stack']} / {q['vs']} | "
                     + " | ".join(f"{q[k]:.2f}x" for k in speed + [k for k, _ in mems])
                     + f" | {q['final_loss'][0]:.4f}, {q['final_loss'][1]:.4f} |")
    if res.get("max_context"):
        how = ("torch.cuda.set_per_process_memory_fraction" if cuda
               else "simulated on the CPU: tensor bytes allocated during training")
        L += ["", f"## Max context at batch 1 under a {_gib(s['cap_bytes'])} cap ({how})", "",
              f"One process per stack: a warm-up step at 256 tokens, then one training step per probe, doubling from "
              f"{s['start_seq']}, then probes placed by the measured memory slope and bisection, "
              f"to {s['resolution']} tokens. "
              f"The answer is confirmed by a fresh process that trains {s['steps']} steps at that length.", "",
              "| stack | longest seq that trains | x baseline | first failing seq (search) | probes | "
              "fresh-process confirmation |",
              "|---|---:|---:|---:|---:|---|"]
        for r in res["max_context"]:
            if r.get("error"):
                L.append(f"| {r['stack']} | FAILED | - | - | {len(r['probes'])} | {r['error'].splitlines()[0][:120]} |")
                continue
            first = "none up to the search cap" if r["hit_search_cap"] else f"{r['first_failure']:,}"
            x = f"{r['vs_baseline']:.2f}x" if r.get("vs_baseline") else "-"
            conf = ", ".join(f"{c['seq_len']:,} {'fits' if c['ok'] else 'OOM'}" for c in r["confirmed"]) or "-"
            L.append(f"| {r['stack']} | {r['max_seq_len']:,} | {x} | {first} | {len(r['probes'])} | {conf} |")
    L += ["", "Each stack ran in its own process. " + (
        "Memory is the PyTorch caching allocator's view (no CUDA context, no allocator overhead outside it)."
        if cuda else
        "RSS includes the libraries' code and allocator caches; 'above imports' subtracts the RSS measured "
        "after importing the same libraries in every stack. 4-bit matmuls on the CPU run bitsandbytes' CPU kernels "
        "(both stacks), so CPU speed says little about CUDA speed.")]
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-hidden model, seq 64, 4 steps (CI smoke size)")
    p.add_argument("--stacks", help=f"comma-separated subset of {','.join(STACKS)} (default: the mode's)")
    p.add_argument("--steps", type=int, help="training steps per stack (>= 3; tokens/s counts steps 3..N)")
    p.add_argument("--repeats", type=int,
                   help="runs per stack, interleaved; the best speed counts (default: the mode's)")
    p.add_argument("--seq-len", type=int, help="override the mode's sequence length")
    p.add_argument("--batch", type=int, action="append", help="micro-batch size (repeat for several)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="paged_adamw_8bit")
    p.add_argument("--qlora-adapter-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                   help=f"qlora's loss chunk (the trainer's: {CHUNK_TOKENS})")
    p.add_argument("--tile-tokens", type=int, default=4096, help="qlora-long: tokens per MLP and norm tile")
    p.add_argument("--cap-gib", type=float, default=24.0, help="max-context: memory cap per process")
    p.add_argument("--start-seq", type=int, default=4096, help="max-context: first probe")
    p.add_argument("--max-seq", type=int, default=1 << 20, help="max-context: stop doubling here")
    p.add_argument("--resolution", type=int, default=1024,
                   help="max-context: bisect until the bracket is this narrow")
    p.add_argument("--budget-min", type=float, help="wall-clock budget: start no stack after it, "
                   "stop a running one at it (results so far are written after every stack)")
    p.add_argument("--checkpoint-dir",
                   help="where to write (or reuse) the random-weight checkpoint; default a temp dir")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--threads", type=int, help="torch/OpenMP threads per stack (default: torch's); "
                   "1 is steadier on a busy shared CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mode = dict(MODES[args.mode], **(TINY if args.tiny else {}))
    if mode["device"] == "cuda" and not torch.cuda.is_available():
        p.error(f"--mode {args.mode} needs a CUDA GPU; this machine has none (use --mode cpu)")
    stacks = args.stacks.split(",") if args.stacks else mode["stacks"]
    bad = [s for s in stacks if s not in STACKS]
    if bad:
        p.error(f"unknown stack(s) {bad}; valid: {', '.join(STACKS)}")
    steps = args.steps or mode["steps"]
    repeats = args.repeats or mode.get("repeats", 1)
    if steps < (2 if args.mode == "max-context" else 3):
        p.error("--steps must be >= 3 (tokens/s is measured over steps 3..N; max-context needs >= 2)")
    arch = MODELS[mode["model"]]
    seq_len = args.seq_len or mode["seq_len"]
    batches = args.batch or mode["batches"]
    settings = dict(steps=steps, repeats=repeats, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                    lr=args.lr, optimizer=args.optimizer, qlora_adapter_dtype=args.qlora_adapter_dtype,
                    chunk_tokens=args.chunk_tokens, tile_tokens=args.tile_tokens, seq_len=seq_len,
                    batches=batches, stacks=stacks,
                    threads=args.threads, pytorch_cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    res = dict(mode=args.mode + ("-tiny" if args.tiny else ""),
               command="python bench/train.py " + " ".join(sys.argv[1:]),
               date=datetime.date.today().isoformat(), device=mode["device"], device_name=device_name(mode["device"]),
               versions=package_versions("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
               torch_threads=args.threads or torch.get_num_threads(), settings=settings)
    if mode["device"] == "cuda":
        res["device_name"] += f"; host CPU {device_name('cpu')}"
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"train-{res['mode']}"

    def save() -> None:  # after every child: a command stopped at a device's time limit keeps what it measured
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        write_markdown(stem.with_suffix(".md"), res)

    budget = Budget(args.budget_min)
    with tempfile.TemporaryDirectory(prefix="qlora-bench-train-") as tmp:
        ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tmp) / "ckpt"
        if (ckpt / "config.json").is_file() and (ckpt / "model.safetensors.index.json").is_file():
            facts = json.loads((ckpt / "bench-facts.json").read_text())
            if facts.get("arch") != arch:
                p.error(f"--checkpoint-dir {ckpt} holds a different architecture; use an empty folder")
            print(f"reusing checkpoint {ckpt}", flush=True)
        else:
            t0 = time.perf_counter()
            facts = dict(make_checkpoint(ckpt, arch, args.seed), arch=arch)
            (ckpt / "bench-facts.json").write_text(json.dumps(facts))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the draw's cached blocks must not sit beside the children's runs
            print(f"wrote random-weight checkpoint ({facts['params'] / 1e6:.1f} M params, "
                  f"{_gib(facts['checkpoint_bytes'])}) in {time.perf_counter() - t0:.0f} s", flush=True)
        res["model"] = dict(name=mode["model"], params=facts["params"], **arch)
        base = dict(model_dir=str(ckpt), device=mode["device"], seq_len=seq_len, steps=steps, rank=args.rank,
                    alpha=args.alpha, dropout=args.dropout, lr=args.lr, optimizer=args.optimizer,
                    qlora_adapter_dtype=args.qlora_adapter_dtype, chunk_tokens=args.chunk_tokens, seed=args.seed,
                    tile_tokens=args.tile_tokens,
                    vocab_size=arch["vocab_size"], threads=args.threads)
        if args.mode == "max-context":
            cap = int(args.cap_gib * 2**30)
            settings.update(cap_bytes=cap, start_seq=args.start_seq, max_seq=args.max_seq, resolution=args.resolution)
            print(f"max context at batch 1 under {_gib(cap)}:", flush=True)

            def got(rows: list[dict]) -> None:
                by = {r["stack"]: r["max_seq_len"] for r in rows}
                for r in rows:
                    r["vs_baseline"] = r["max_seq_len"] / by[BASELINE] if by.get(BASELINE) else None
                res["max_context"] = rows
                save()

            max_context(dict(base, cap_bytes=cap), stacks, args.start_seq, args.max_seq, args.resolution, budget, got)
            for r in res["max_context"]:
                if r["stack"] != BASELINE and r["vs_baseline"]:
                    print(f"  {r['stack']} / {BASELINE}: {r['vs_baseline']:.2f}x ({r['max_seq_len']:,} vs "
                          f"{r['max_seq_len'] / r['vs_baseline']:,.0f} tokens)")
        else:
            print(f"training {len(stacks)} stacks x batch {batches} x seq {seq_len}, {steps} steps each:", flush=True)

            def got(runs: list[dict]) -> None:
                res["runs"] = runs
                res["summary"] = summarize(runs)
                res["ratios"] = ratios(res["summary"], mode["device"])
                save()

            train_runs(base, stacks, batches, repeats, budget, got)
            same = {(r["batch"], r["trainable_params"]) for r in res["runs"] if not r.get("error")}
            if len({b for b, _ in same}) != len(same):
                print(f"WARNING: stacks train different parameter counts: {sorted(same)}", flush=True)
            for q in res["ratios"]:
                mems = ", ".join(f"{k} {v:.2f}x" for k, v in q.items() if k.startswith(("cuda_", "peak_")))
                print(f"  b={q['batch']} {q['stack']} / {q['vs']}: tokens/s {q['tokens_per_s']:.2f}x "
                      f"(median step {q['tokens_per_s_median_step']:.2f}x), {mems}, "
                      f"final loss {q['final_loss'][0]:.4f} vs {q['final_loss'][1]:.4f}")
    save()
    print(f"wrote {stem}.json and .md")
    failed = [r["stack"] for r in res.get("runs", []) + res.get("max_context", []) if r.get("error")]
    if failed:
        print(f"FAILED or not run: {', '.join(dict.fromkeys(failed))} (errors in {stem}.json)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
