"""Benchmark quant against bitsandbytes: 4-bit throughput and the streaming loader's host memory.

    .venv/bin/python bench/quant.py            # CPU always, CUDA too when available
    .venv/bin/python bench/quant.py --quick    # smaller shapes and checkpoint (a smoke run)

Writes bench/results/quant-<device>.json and .md (device, library versions, date).

1. Throughput, side by side in one process: quantize and dequantize of
   realistic bf16 weight shapes (Llama-3-8B's 4096x4096 attention and
   4096x14336 MLP matrices), NF4 + double quant, blocksize 64, for
   quant's torch path and bitsandbytes' kernels; on CUDA also quant's
   ``dequantize_4bit(backend='auto')`` (bitsandbytes kernel) vs ``backend='torch'``.
   Reported in Melem/s and GB/s of 16-bit weight processed (2 bytes/elem).
   Best of N runs after a warm-up (min is the least noisy on a shared machine).
2. Host memory of loading a random-weight Llama-style checkpoint of a few
   hundred MB, each loader in a fresh subprocess: quant.load_quantized_model
   vs transformers.from_pretrained + BitsAndBytesConfig. Reported: peak RSS
   above the post-import baseline, RSS kept by the loaded model, and their
   difference (the loader's transient overhead), next to the checkpoint size
   and its largest tensor. Peak RSS is sampled every 1 ms by a thread, and
   getrusage's high-water mark is used too when the load raised it above
   the imports' own peak.

Speed and memory are findings, not pass/fail tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _machine import device_name, package_versions  # bench/ siblings: the script's folder is on the path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SHAPES = ((4096, 4096), (4096, 14336))
QUICK_SHAPES = ((1024, 1024), (1024, 3584))


# ---- throughput ------------------------------------------------------------------


def _timeit(fn, device: torch.device, reps: int) -> float:
    """Best wall time of ``reps`` calls after one warm-up, in seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput(device: torch.device, shapes, reps: int) -> list[dict]:
    import bitsandbytes.functional as bnbf

    from quant import dequantize_4bit, quantize_4bit

    rows = []
    for shape in shapes:
        w = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
        n = w.numel()
        packed, state = quantize_4bit(w, "nf4", 64, True)
        bq, bs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        # Recorded, not asserted: the tests pin bit-exactness against bnb's CPU kernels; on CUDA this is the check.
        same = bool(torch.equal(packed, bq) and torch.equal(state.absmax, bs.absmax))
        # Each case binds this shape's tensors (default arguments); it is timed before the next shape is built.
        cases = {
            ("quantize", "quant (torch)"): lambda w=w: quantize_4bit(w, "nf4", 64, True),
            ("quantize", "bitsandbytes"):
                lambda w=w: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
            ("dequantize", "quant (torch)"):
                lambda packed=packed, state=state: dequantize_4bit(packed, state, torch.bfloat16, backend="torch"),
            ("dequantize", "bitsandbytes"): lambda bq=bq, bs=bs: bnbf.dequantize_4bit(bq, bs),
        }
        if device.type == "cuda":
            cases[("dequantize", "quant (auto = bnb kernel)")] = (
                lambda packed=packed, state=state: dequantize_4bit(packed, state, torch.bfloat16, backend="auto"))
        for (op, impl), fn in cases.items():
            s = _timeit(fn, device, reps)
            rows.append(dict(
                device=device.type, op=op, impl=impl, shape=list(shape), bit_identical_to_bnb=same,
                ms=round(s * 1e3, 3), melem_per_s=round(n / s / 1e6, 1), gb_per_s_bf16=round(2 * n / s / 1e9, 3),
            ))
            print(f"  {device.type:4s} {op:10s} {impl:26s} {shape[0]}x{shape[1]:<6d} {s * 1e3:9.2f} ms  "
                  f"{n / s / 1e6:9.1f} Melem/s", flush=True)
        del w, packed, state, bq, bs, cases, fn  # the cases hold the tensors too: free them before the next shape
    return rows


# ---- host memory of loading ------------------------------------------------------


def make_checkpoint(path: Path, quick: bool) -> dict:
    """A random-weight Llama-style bf16 checkpoint, written without building the model."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512 if quick else 1024, intermediate_size=1536 if quick else 3584,
        num_hidden_layers=4 if quick else 8, num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )
    with init_empty_weights():
        shapes = {k: v.shape
                  for k, v in AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(str(path))
    sizes = [t.nbytes for t in tensors.values()]
    return dict(checkpoint_bytes=sum(sizes), largest_tensor_bytes=max(sizes), n_tensors=len(sizes),
                params=sum(t.numel() for t in tensors.values()))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _rss_split() -> dict[str, int]:
    """RssAnon (heap: tensors, allocator caches) and RssFile (mapped files: library code, mmapped checkpoints)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            out[k.lower()] = int(v.split()[0]) * 1024
    return out


def child(loader: str, model_dir: str, device: str) -> None:
    """Run one load in this (fresh) process and print a JSON line of memory facts."""
    import bitsandbytes  # noqa: F401  (imports out of the measurement)
    import transformers  # noqa: F401

    import quant  # noqa: F401

    if device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA context outside the measurement
    base, split0 = _rss(), _rss_split()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; includes the imports' peak
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if loader == "quant":
        from quant import load_quantized_model

        model = load_quantized_model(model_dir, device=device)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map=device)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    after, split1 = _rss(), _rss_split()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The high-water mark only says something about the load if the load raised it.
    if maxrss > maxrss0:
        peak[0] = max(peak[0], maxrss)
    model_bytes = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps(dict(
        loader=loader, device=device, seconds=round(seconds, 2), peak_delta=peak[0] - base,
        rusage_raised=maxrss > maxrss0, kept_delta=after - base, model_bytes=model_bytes,
        kept_anon_delta=split1.get("rssanon", 0) - split0.get("rssanon", 0),
        kept_file_delta=split1.get("rssfile", 0) - split0.get("rssfile", 0),
    )))


def memory(quick: bool, devices: list[str], runs: int) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        facts = make_checkpoint(ckpt, quick)
        print(f"  checkpoint: {facts['checkpoint_bytes'] / 2**20:.0f} MiB, "
              f"largest tensor {facts['largest_tensor_bytes'] / 2**20:.1f} MiB", flush=True)
        rows = []
        for run, device, loader in ((r, d, lo) for r in range(runs) for d in devices
                                    for lo in ("quant", "transformers+bnb")):
            out = subprocess.run(
                [sys.executable, __file__, "--child", loader, str(ckpt), device],
                capture_output=True, text=True, check=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"),
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["run"] = run + 1
            r["transient_delta"] = r["peak_delta"] - r["kept_delta"]
            r["peak_over_checkpoint"] = round(r["peak_delta"] / facts["checkpoint_bytes"], 3)
            r["transient_over_largest_tensor"] = round(r["transient_delta"] / facts["largest_tensor_bytes"], 2)
            rows.append(r)
            print(f"  run {run + 1} {device:4s} {loader:18s} peak +{r['peak_delta'] / 2**20:7.1f} MiB  "
                  f"kept +{r['kept_delta'] / 2**20:7.1f} MiB  "
                  f"transient {r['transient_delta'] / 2**20:7.1f} MiB  ({r['seconds']:.1f} s)", flush=True)
        return facts, rows


# ---- report -----------------------------------------------------------------------


def write_markdown(path: Path, res: dict) -> None:
    L = [f"# quant benchmark: {res['device_name']}", "",
         f"Date {res['date']}; command `{res['command']}`; torch threads {res['torch_threads']}.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
         "## Throughput (NF4 + double quant, blocksize 64, bf16 weights; best of runs)", "",
         "| device | op | implementation | shape | ms | Melem/s | GB/s (bf16) | quant == bnb bytes |",
         "|---|---|---|---|---:|---:|---:|---|"]
    for r in res["throughput"]:
        L.append(f"| {r['device']} | {r['op']} | {r['impl']} | {r['shape'][0]}x{r['shape'][1]} | {r['ms']:.2f} | "
                 f"{r['melem_per_s']:.1f} | {r['gb_per_s_bf16']:.2f} | "
                 f"{'yes' if r['bit_identical_to_bnb'] else 'NO'} |")
    f = res["checkpoint"]
    L += ["", "## Host memory of loading a checkpoint", "",
          f"Random-weight Llama-style bf16 checkpoint: {f['checkpoint_bytes'] / 2**20:.0f} MiB, "
          f"{f['params'] / 1e6:.0f} M params, {f['n_tensors']} tensors, "
          f"largest {f['largest_tensor_bytes'] / 2**20:.1f} MiB. RSS deltas are above the post-import baseline; "
          "'kept' is what the loaded model holds in host memory (all of it on CPU), "
          "'transient' = peak - kept is the loader's own overhead.", "",
          "| run | device | loader | peak RSS delta | peak / checkpoint | kept (anon + file) | model tensors | "
          "transient | transient / largest tensor | seconds |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["memory"]:
        L.append(f"| {r['run']} | {r['device']} | {r['loader']} | {r['peak_delta'] / 2**20:.1f} MiB | "
                 f"{r['peak_over_checkpoint']:.2f} | {r['kept_delta'] / 2**20:.1f} MiB "
                 f"({r['kept_anon_delta'] / 2**20:.0f} + {r['kept_file_delta'] / 2**20:.0f}) | "
                 f"{r['model_bytes'] / 2**20:.1f} MiB | {r['transient_delta'] / 2**20:.1f} MiB | "
                 f"{r['transient_over_largest_tensor']:.2f} | {r['seconds']:.1f} |")
    L += ["", "'model tensors' sums the loaded model's parameters and buffers. 'anon' is heap memory (tensors, "
          "allocator caches); 'file' is file-backed pages (library code paged in by first kernel use, and "
          "memory-mapped checkpoint pages a loader keeps mapped). 'seconds' includes each loader's first-use "
          "imports; the machine is shared, so timings are noisy."]
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and checkpoint (smoke run)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (best is reported)")
    p.add_argument("--mem-runs", type=int, default=2, help="fresh-process loads per loader (all are reported)")
    p.add_argument("--child", nargs=3, metavar=("LOADER", "DIR", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = QUICK_SHAPES if args.quick else SHAPES
    res = dict(command="python bench/quant_speed.py" + (" --quick" if args.quick else ""),
               date=datetime.date.today().isoformat(),
               versions=package_versions("torch", "bitsandbytes", "transformers", "safetensors"),
               torch_threads=torch.get_num_threads(), throughput=[])
    print("throughput:", flush=True)
    for d in devices:
        res["throughput"] += throughput(torch.device(d), shapes, args.reps)
    print("host memory of loading:", flush=True)
    res["checkpoint"], res["memory"] = memory(args.quick, devices, args.mem_runs)
    tag = "cuda" if "cuda" in devices else "cpu"
    res["device_name"] = device_name(tag) + (f"; host CPU {device_name('cpu')}" if tag == "cuda" else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (f"quant-{tag}" + ("-quick" if args.quick else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), res)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
