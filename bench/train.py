"""Train the same work with the standard HF stack and with qlora in one command; print qlora/baseline ratios.

    .venv/bin/python bench/train.py                       # --mode cpu: 4-layer 512-hidden Llama, minutes on 2 cores
    .venv/bin/python bench/train.py --mode cuda           # Llama-3.1-8B architecture, seq 2048, batch 1 and 4
    .venv/bin/python bench/train.py --mode max-context    # longest seq at batch 1 under a 24 GiB cap, per stack
    # the 8B random checkpoint is 16 GB: --checkpoint-dir DIR writes it once and reuses it across commands
    .venv/bin/python bench/train.py --tiny --results-dir /tmp/x   # seconds: the CI smoke size

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
* ``qlora``: ``quant.load_quantized_model`` + ``qlora.surgery.apply_lora`` +
  ``qlora.run_setup.enable_checkpointing`` + ``qlora.train.forward_loss``
  (chunked cross-entropy, 1,024 tokens per chunk).
* ``qlora-offload``: the same with ``offload_activations`` (checkpointed layer
  inputs in pinned host memory; a no-op move on the CPU, so not run there by default).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, also when loaded by path from tests
from _machine import device_name, package_versions  # noqa: E402

ROOT = Path(__file__).resolve().parent
# bench/ holds quant.py: drop this folder from the import path so `import quant` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]

from qlora.optim import OPTIMIZERS  # noqa: E402  (after the path fix)
from qlora.run_setup import CHUNK_TOKENS  # noqa: E402
RESULTS = ROOT / "results"
STACKS = ("hf", "hf-no-upcast", "qlora", "qlora-offload", "qlora-unchunked")
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
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
MODES = {
    "cpu": dict(model="cpu-llama-4x512", device="cpu", seq_len=1024, batches=[2], steps=5, repeats=2,
                stacks=["hf", "hf-no-upcast", "qlora", "qlora-unchunked"]),
    "cuda": dict(model="llama-3.1-8b", device="cuda", seq_len=2048, batches=[1, 4], steps=10,
                 stacks=["hf", "hf-no-upcast", "qlora", "qlora-offload", "qlora-unchunked"]),
    "max-context": dict(model="llama-3.1-8b", device="cuda", seq_len=None, batches=[1], steps=2,
                        stacks=["hf", "qlora", "qlora-offload"]),
}
TINY = dict(model="tiny", seq_len=64, batches=[2], steps=4, repeats=1)


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
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).state_dict().items()}
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
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(str(path))
    return dict(params=sum(s.numel() for s in shapes.values()), checkpoint_bytes=total, tensors=len(shapes))


def run_child(spec: dict, timeout_s: float | None = None) -> dict:
    """Train one stack as ``spec`` says in a fresh Python process (bench/train_stacks.py); its measurements.

    Raises:
        RuntimeError: the child failed for a reason other than running out of memory.
    """
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # bitsandbytes' CPU kernels use OpenMP too
    p = subprocess.run([sys.executable, str(ROOT / "train_stacks.py"), json.dumps(spec)], capture_output=True,
                       text=True, env=env, timeout=timeout_s)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"stack {spec['stack']} (batch {spec['batch']}, seq {spec['seq_len']}) failed with exit code "
                           f"{p.returncode}:\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---- modes ---------------------------------------------------------------------------


def _gib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


SPEEDS = ("tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step", "tokens_per_cpu_s")
MEMORY = ("peak_rss", "peak_rss_above_imports", "peak_rss_anon", "rss_setup",
          "cuda_max_allocated", "cuda_max_reserved", "cuda_allocated_setup")


def train_runs(base: dict, stacks: list[str], batches: list[int], repeats: int) -> list[dict]:
    """Every stack x batch, ``repeats`` times, interleaved (a slow spell on a shared machine hits every stack)."""
    runs = []
    for rep in range(repeats):
        for batch in batches:
            for stack in stacks:
                r = dict(run_child(dict(base, stack=stack, batch=batch)), repeat=rep + 1)
                runs.append(r)
                if base["device"] == "cuda":
                    mem = f"max allocated {_gib(r['cuda_max_allocated'])}, reserved {_gib(r['cuda_max_reserved'])}"
                else:
                    mem = f"peak RSS {_gib(r['peak_rss'])} (+{_gib(r['peak_rss_above_imports'])} above imports)"
                tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
                print(f"  run {rep + 1} b={batch} seq={base['seq_len']} {stack:14s} {'ok ' if r['ok'] else 'OOM' if r['oom'] else 'bad'} "
                      f"{tps:>8s} tok/s  {mem}  final loss {r['final_loss']}", flush=True)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per stack x batch over its repeats: the best speed (the least disturbed run), the largest peak, the final loss."""
    out = []
    for key in dict.fromkeys((r["batch"], r["stack"]) for r in runs):
        rs = [r for r in runs if (r["batch"], r["stack"]) == key]
        ok = all(r["ok"] for r in rs)
        row = dict(batch=key[0], stack=key[1], seq_len=rs[0]["seq_len"], repeats=len(rs), ok=ok, oom=any(r["oom"] for r in rs),
                   final_loss=rs[0]["final_loss"], final_losses=[r["final_loss"] for r in rs],
                   trainable_params=rs[0]["trainable_params"], model_bytes_by_dtype=rs[0]["model_bytes_by_dtype"])
        for k in SPEEDS:
            row[k] = max(r[k] for r in rs) if ok else None
        for k in MEMORY:
            if all(k in r for r in rs):
                row[k] = max(r[k] for r in rs)
        out.append(row)
    return out


def ratios(summary: list[dict], device: str) -> list[dict]:
    """qlora-family / baseline and hf-no-upcast / hf for each batch size (> 1 speed is faster, < 1 memory is smaller)."""
    mem_keys = ("cuda_max_allocated", "cuda_max_reserved") if device == "cuda" else ("peak_rss", "peak_rss_above_imports", "peak_rss_anon")
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


def search_longest(fits: Callable[[int], bool], start: int, max_seq: int, resolution: int) -> tuple[int, int | None]:
    """The longest length ``fits`` accepts: double from ``start``, then bisect on multiples of ``resolution``.

    Assumes ``fits`` is monotone (true up to some length, false beyond).

    Returns:
        (longest length that fit, 0 if none; shortest that failed, None if
        every length up to ``max_seq`` fit).
    """
    lo, hi, seq = 0, None, start
    while seq <= max_seq:
        if not fits(seq):
            hi = seq
            break
        lo, seq = seq, seq * 2
    while hi is not None and hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if mid <= lo:  # the bracket is narrower than one step of the grid
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def max_context(base: dict, stacks: list[str], start: int, max_seq: int, resolution: int) -> list[dict]:
    """Longest trainable sequence per stack: double from ``start`` until a probe fails, then bisect to ``resolution``.

    A probe is a fresh child that must finish ``base['steps']`` steps (the
    first creates optimizer state) at batch 1 without running out of memory.
    """
    out = []
    for stack in stacks:
        probes = []

        def ok(seq: int) -> bool:
            t0 = time.perf_counter()
            r = run_child(dict(base, stack=stack, batch=1, seq_len=seq))
            probes.append(dict(seq_len=seq, ok=r["ok"], oom=r["oom"], cuda_max_allocated=r.get("cuda_max_allocated"),
                               cuda_max_reserved=r.get("cuda_max_reserved"), seconds=round(time.perf_counter() - t0, 1)))
            print(f"  {stack:14s} seq {seq:>7d}: {'fits' if r['ok'] else 'OOM' if r['oom'] else 'non-finite loss'}"
                  f"  (max allocated {_gib(r.get('cuda_max_allocated') or 0)})", flush=True)
            if not r["ok"] and not r["oom"]:
                raise RuntimeError(f"{stack} at seq {seq} produced a non-finite loss; not a memory limit")
            return r["ok"]

        lo, hi = search_longest(ok, start, max_seq, resolution)
        out.append(dict(stack=stack, max_seq_len=lo, first_failure=hi, hit_search_cap=hi is None, probes=probes))
    return out


# ---- report ---------------------------------------------------------------------------


def write_markdown(path: Path, res: dict) -> None:
    s, m = res["settings"], res["model"]
    cuda = res["device"] == "cuda"
    L = [f"# Training benchmark ({res['mode']}): qlora vs transformers + PEFT + bitsandbytes", "",
         f"Device: {res['device_name']}. Date {res['date']}; command `{res['command']}`; torch threads {res['torch_threads']}.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
         f"Model: Llama architecture `{m['name']}` with random weights ({m['params'] / 1e6:.1f} M params: {m['num_hidden_layers']} layers, "
         f"hidden {m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV, "
         f"vocab {m['vocab_size']}). LoRA r={s['rank']}, alpha={s['alpha']:g}, dropout {s['dropout']:g} on all linear layers; "
         f"optimizer {s['optimizer']} lr {s['lr']:g}; bf16 autocast; random token ids, every token a target; "
         f"adapters: PEFT fp32 (its default), qlora {s['qlora_adapter_dtype']}; qlora loss chunk {s['chunk_tokens']} tokens.", ""]
    if res.get("summary"):
        mem_head = "max allocated | max reserved | allocated after setup" if cuda else "peak RSS | peak RSS above imports | peak anon RSS"
        speed = ["tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step"] + ([] if cuda else ["tokens_per_cpu_s"])
        speed_head = "tokens/s | tokens/s (median step) | tokens/s (best step)" + ("" if cuda else " | tokens per CPU-second")
        L += [f"## Per stack ({s['steps']} steps per run, speed over steps 3..{s['steps']}; best speed and largest peak "
              f"over {s['repeats']} run(s))", "",
              f"| stack | batch x seq | {speed_head} | {mem_head} | final loss | trainable params | params+buffers by dtype |",
              "|---|---|" + "---:|" * (len(speed) + 5) + "---|"]
        for r in res["summary"]:
            mem = [r.get(k, 0) for k in (("cuda_max_allocated", "cuda_max_reserved", "cuda_allocated_setup") if cuda
                                         else ("peak_rss", "peak_rss_above_imports", "peak_rss_anon"))]
            dt = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(r["model_bytes_by_dtype"].items()))
            tps = " | ".join(f"{r[k]:.1f}" if r[k] else ("OOM" if r["oom"] else "-") for k in speed)
            loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
            L.append(f"| {r['stack']} | {r['batch']} x {r['seq_len']} | {tps} | " + " | ".join(_gib(x or 0) for x in mem)
                     + f" | {loss} | {r['trainable_params']:,} | {dt} |")
        k = "cuda_max_allocated" if cuda else "peak_rss"
        L += ["", "All runs (tokens/s over steps 3..N; step seconds; peak):", "",
              "| run | stack | batch | tokens/s | step seconds | peak |", "|---|---|---|---:|---|---:|"]
        for r in res["runs"]:
            tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else ("OOM" if r["oom"] else "-")
            L.append(f"| {r['repeat']} | {r['stack']} | {r['batch']} | {tps} | {', '.join(f'{t:.2f}' for t in r['step_s'])} | "
                     f"{_gib(r.get(k) or 0)} |")
    if res.get("ratios"):
        mems = [("cuda_max_allocated", "max allocated"), ("cuda_max_reserved", "max reserved")] if cuda else [
            ("peak_rss", "peak RSS"), ("peak_rss_above_imports", "peak RSS above imports"), ("peak_rss_anon", "peak anon RSS")]
        speed = ["tokens_per_s", "tokens_per_s_median_step", "tokens_per_s_best_step"] + ([] if cuda else ["tokens_per_cpu_s"])
        speed_head = "tokens/s | tokens/s (median step) | tokens/s (best step)" + ("" if cuda else " | tokens per CPU-second")
        L += ["", "## Ratios (speed: > 1 is faster; memory: < 1 is smaller)", "",
              f"| batch | stack / baseline | {speed_head} | " + " | ".join(n for _, n in mems) + " | final loss (stack, baseline) |",
              "|---|---|" + "---:|" * (len(speed) + len(mems)) + "---|"]
        for q in res["ratios"]:
            L.append(f"| {q['batch']} | {q['stack']} / {q['vs']} | " + " | ".join(f"{q[k]:.2f}x" for k in speed + [k for k, _ in mems])
                     + f" | {q['final_loss'][0]:.4f}, {q['final_loss'][1]:.4f} |")
    if res.get("max_context"):
        L += ["", f"## Max context at batch 1 under a {_gib(s['cap_bytes'])} cap (torch.cuda.set_per_process_memory_fraction)", "",
              f"Doubling from {s['start_seq']} then bisecting to {s['resolution']} tokens; each probe is a fresh process "
              f"that must finish {s['steps']} steps.", "",
              "| stack | longest seq that trains | x baseline | first failing seq | probes |", "|---|---:|---:|---:|---:|"]
        for r in res["max_context"]:
            first = "none up to the search cap" if r["hit_search_cap"] else f"{r['first_failure']:,}"
            x = f"{r['vs_baseline']:.2f}x" if r.get("vs_baseline") else "-"
            L.append(f"| {r['stack']} | {r['max_seq_len']:,} | {x} | {first} | {len(r['probes'])} |")
    L += ["", "Each stack ran in its own process. " + (
        "Memory is the PyTorch caching allocator's view (no CUDA context, no allocator overhead outside it)." if cuda else
        "RSS includes the libraries' code and allocator caches; 'above imports' subtracts the RSS measured after importing "
        "the same libraries in every stack. 4-bit matmuls on the CPU run bitsandbytes' CPU kernels (both stacks), so "
        "CPU speed says little about CUDA speed.")]
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-hidden model, seq 64, 4 steps (CI smoke size)")
    p.add_argument("--stacks", help=f"comma-separated subset of {','.join(STACKS)} (default: the mode's)")
    p.add_argument("--steps", type=int, help="training steps per stack (>= 3; tokens/s counts steps 3..N)")
    p.add_argument("--repeats", type=int, help="runs per stack, interleaved; the best speed counts (default: the mode's)")
    p.add_argument("--seq-len", type=int, help="override the mode's sequence length")
    p.add_argument("--batch", type=int, action="append", help="micro-batch size (repeat for several)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="paged_adamw_8bit")
    p.add_argument("--qlora-adapter-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help=f"qlora's loss chunk (the trainer's: {CHUNK_TOKENS})")
    p.add_argument("--cap-gib", type=float, default=24.0, help="max-context: memory cap per process")
    p.add_argument("--start-seq", type=int, default=4096, help="max-context: first probe")
    p.add_argument("--max-seq", type=int, default=1 << 20, help="max-context: stop doubling here")
    p.add_argument("--resolution", type=int, default=1024, help="max-context: bisect until the bracket is this narrow")
    p.add_argument("--checkpoint-dir", help="where to write (or reuse) the random-weight checkpoint; default a temp dir")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--threads", type=int, help="torch/OpenMP threads per stack (default: torch's); 1 is steadier on a busy shared CPU")
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
    settings = dict(steps=steps, repeats=repeats, rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                    optimizer=args.optimizer, qlora_adapter_dtype=args.qlora_adapter_dtype, chunk_tokens=args.chunk_tokens,
                    seq_len=seq_len, batches=batches, stacks=stacks, threads=args.threads,
                    pytorch_cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    res = dict(mode=args.mode + ("-tiny" if args.tiny else ""), command="python bench/train.py " + " ".join(sys.argv[1:]),
               date=datetime.date.today().isoformat(), device=mode["device"], device_name=device_name(mode["device"]),
               versions=package_versions("torch", "transformers", "peft", "bitsandbytes", "accelerate"), torch_threads=args.threads or torch.get_num_threads(), settings=settings)
    if mode["device"] == "cuda":
        res["device_name"] += f"; host CPU {device_name('cpu')}"
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
            print(f"wrote random-weight checkpoint ({facts['params'] / 1e6:.1f} M params, {_gib(facts['checkpoint_bytes'])}) "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
        res["model"] = dict(name=mode["model"], params=facts["params"], **arch)
        base = dict(model_dir=str(ckpt), device=mode["device"], seq_len=seq_len, steps=steps, rank=args.rank, alpha=args.alpha,
                    dropout=args.dropout, lr=args.lr, optimizer=args.optimizer, qlora_adapter_dtype=args.qlora_adapter_dtype,
                    chunk_tokens=args.chunk_tokens, seed=args.seed, vocab_size=arch["vocab_size"], threads=args.threads)
        if args.mode == "max-context":
            cap = int(args.cap_gib * 2**30)
            settings.update(cap_bytes=cap, start_seq=args.start_seq, max_seq=args.max_seq, resolution=args.resolution)
            print(f"max context at batch 1 under {_gib(cap)}:", flush=True)
            res["max_context"] = max_context(dict(base, cap_bytes=cap), stacks, args.start_seq, args.max_seq, args.resolution)
            by = {r["stack"]: r["max_seq_len"] for r in res["max_context"]}
            for r in res["max_context"]:
                r["vs_baseline"] = r["max_seq_len"] / by[BASELINE] if by.get(BASELINE) else None
                if r["stack"] != BASELINE and r["vs_baseline"]:
                    print(f"  {r['stack']} / {BASELINE}: {r['vs_baseline']:.2f}x ({r['max_seq_len']:,} vs {by[BASELINE]:,} tokens)")
        else:
            print(f"training {len(stacks)} stacks x batch {batches} x seq {seq_len}, {steps} steps each:", flush=True)
            res["runs"] = train_runs(base, stacks, batches, repeats)
            res["summary"] = summarize(res["runs"])
            res["ratios"] = ratios(res["summary"], mode["device"])
            same = {(r["batch"], r["trainable_params"]) for r in res["runs"]}
            if len({b for b, _ in same}) != len(same):
                print(f"WARNING: stacks train different parameter counts: {sorted(same)}", flush=True)
            for q in res["ratios"]:
                mems = ", ".join(f"{k} {v:.2f}x" for k, v in q.items() if k.startswith(("cuda_", "peak_")))
                print(f"  b={q['batch']} {q['stack']} / {q['vs']}: tokens/s {q['tokens_per_s']:.2f}x "
                      f"(median step {q['tokens_per_s_median_step']:.2f}x), {mems}, "
                      f"final loss {q['final_loss'][0]:.4f} vs {q['final_loss'][1]:.4f}")
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"train-{res['mode']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), res)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
