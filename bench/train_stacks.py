"""One stack of bench/train.py, trained in this (fresh) process: ``python bench/train_stacks.py SPEC_JSON``.

Prints one JSON line of measurements. bench/train.py starts one process per
stack and run, so host RSS and CUDA peaks never mix and an out-of-memory
probe cannot poison the next one. The stacks are described in bench/train.py.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

OPTIMIZERS = {"paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit", "adamw_8bit": "AdamW8bit",
              "adamw": None}


class PeakRSS:
    """Peak resident set size of this process while the block runs (5 ms sampling + getrusage's high-water mark).

    ``peak_anon`` is the sampled peak of resident minus file-backed pages:
    heap memory (tensors, allocator caches) without library code or
    memory-mapped checkpoint pages a loader keeps mapped.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self.peak_anon = interval_s, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _statm(self) -> tuple[int, int]:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return int(fields[1]) * self._page, int(fields[2]) * self._page  # resident, file-backed + shared

    def rss(self) -> int:
        return self._statm()[0]

    def _sample(self):
        while not self._stop.is_set():
            res, shared = self._statm()
            self.peak, self.peak_anon = max(self.peak, res), max(self.peak_anon, res - shared)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res, shared = self._statm()
        self.peak, self.peak_anon = res, res - shared
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > self._maxrss0:  # the lifetime high-water mark moved during the block: it is this block's
            self.peak = max(self.peak, maxrss)


def _bytes_by_dtype(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        k = str(t.dtype).removeprefix("torch.")
        out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


def _hf_optimizer(params, name: str, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes.optim as bnb_optim

    return getattr(bnb_optim, OPTIMIZERS[name])(params, lr=lr)


def build_hf(spec: dict, device: torch.device, upcast: bool):
    """transformers + bitsandbytes + PEFT, as the standard stack is used; returns (model, optimizer, step_fn)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": str(device)})
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:  # prepare_model_for_kbit_training without its fp32 cast: freeze, then the same checkpointing call
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    torch.manual_seed(spec["seed"])
    cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                     target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = _hf_optimizer([p for p in model.parameters() if p.requires_grad], spec["optimizer"], spec["lr"])

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)  # the user's loop keeps `out` (and its logits) through backward
        out.loss.backward()
        return float(out.loss.detach())

    return model, opt, step


def build_qlora(spec: dict, device: torch.device, offload: bool, chunked: bool, tile_tokens: int | None = None,
                tiled_norms: bool = True):
    """qlora's own path; returns (model, optimizer, step_fn). ``chunked=False``: transformers' loss on full logits;
    ``tile_tokens``: every MLP (and with ``tiled_norms`` every norm) in tiles of that many tokens (layers.tiling)."""
    from layers.tiling import tile_mlps, tile_norms
    from qlora.lora.surgery import apply_lora, lora_parameters
    from qlora.train.loss import forward_loss
    from qlora.train.optim import build_optimizer
    from qlora.train.setup import enable_checkpointing
    from quant import load_quantized_model

    model = load_quantized_model(spec["model_dir"], device, "nf4", 64, True, torch.bfloat16, dtype=torch.bfloat16)
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])
    apply_lora(model, "all-linear", spec["rank"], spec["alpha"], spec["dropout"], dtype=spec["qlora_adapter_dtype"])
    enable_checkpointing(model, offload_activations=offload)
    if tile_tokens:
        tile_mlps(model, tile_tokens)
        if tiled_norms:
            tile_norms(model, tile_tokens)
    model.train()
    opt = build_optimizer([{"params": lora_parameters(model)}], spec["optimizer"], spec["lr"])
    chunk = spec["chunk_tokens"] if chunked else None

    def step(ids: torch.Tensor) -> float:
        b, s = ids.shape
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(s, device=ids.device).expand(b, s)}
        loss_sum, n = forward_loss(model, batch, chunk, torch.bfloat16)
        (loss_sum / n).backward()
        return float(loss_sum.detach()) / n

    return model, opt, step


def _is_oom(e: BaseException) -> bool:
    # torch.OutOfMemoryError is one; cuBLAS reports its own allocation failures as plain RuntimeErrors
    return isinstance(e, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(e) or "out of memory" in str(e)


def _release(opt, device: torch.device) -> None:
    """Drop gradients and cached blocks after a batch or a failed probe, so the next one starts clean."""
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _simulated_cap(cap: int):
    """A CPU stand-in for a CUDA memory cap: a live-tensor tracker that runs out of memory past ``cap`` bytes.

    It lets CI exercise the max-context search and out-of-memory recovery
    end to end; it says nothing about real limits (tensors that exist before
    it starts are not counted, and every op pays the tracker's Python hook).
    """
    from memory.tracker import LiveTensorTracker

    class _Capped(LiveTensorTracker):
        def _change(self, key, nbytes, tag):
            super()._change(key, nbytes, tag)
            if nbytes > 0 and self.current > cap:
                raise torch.OutOfMemoryError(f"simulated out of memory: {self.current} bytes live > cap {cap}")

    return _Capped("cpu")


def _run_steps(model, opt, step, spec: dict, batch: int, seq: int, steps: int, device: torch.device,
               rss: PeakRSS) -> dict:
    """Train ``steps`` steps at ``batch`` x ``seq`` and measure them; out of memory is a result, not an error."""
    res = dict(stack=spec["stack"], batch=batch, seq_len=seq, ok=False, oom=False)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    pool = [torch.randint(0, spec["vocab_size"], (batch, seq), generator=g) for _ in range(min(4, steps))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        res["cuda_allocated_setup"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    res["rss_setup"] = rss.rss()
    simulated = device.type == "cpu" and spec.get("cap_bytes")
    cap = _simulated_cap(spec["cap_bytes"]) if simulated else contextlib.nullcontext()
    times, cpu_times, losses, oom = [], [], [], False
    try:
        with rss, cap:
            for i in range(steps):
                ids = pool[i % len(pool)].to(device)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                losses.append(step(ids))
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        oom = True  # recover outside the except block: its traceback still holds the failed step's tensors
    res["oom"] = oom
    res["ok"] = not oom and all(math.isfinite(x) for x in losses)
    res["step_s"] = [round(t, 4) for t in times]
    res["step_cpu_s"] = [round(t, 4) for t in cpu_times]
    res["losses"] = [round(x, 5) for x in losses]
    res["final_loss"] = losses[-1] if losses else None
    timed = times[2:]
    tokens = batch * seq
    res["tokens_per_s"] = tokens * len(timed) / sum(timed) if timed else None
    # On a shared machine other processes' load inflates wall time; the median step, and with one
    # thread the process's own CPU time, are the views of the same steps least disturbed by it.
    res["tokens_per_s_median_step"] = tokens / sorted(timed)[len(timed) // 2] if timed else None
    res["tokens_per_s_best_step"] = tokens / min(timed) if timed else None
    res["tokens_per_cpu_s"] = tokens * len(timed) / sum(cpu_times[2:]) if timed else None
    res["peak_rss"], res["peak_rss_anon"] = rss.peak, rss.peak_anon
    if device.type == "cuda":
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        res["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    elif simulated:
        res["simulated_peak"] = cap.peak
    _release(opt, device)
    return res


def _search(model, opt, step, spec: dict, device: torch.device, rss: PeakRSS) -> dict:
    """Max context at batch 1 in this one process: a short step creates optimizer state, then one step per probe."""
    from _search import linear_prediction, search_longest  # bench/ sibling: the script's folder is on the path

    sr = spec["search"]
    warm = _run_steps(model, opt, step, spec, 1, min(sr["start"], 256), 1, device, rss)
    if not warm["ok"]:
        raise RuntimeError(f"{spec['stack']}: the warm-up step at 256 tokens failed ({warm})")
    probes, points = [], []
    peak_key = "cuda_max_reserved" if device.type == "cuda" else "simulated_peak"

    def fits(seq: int) -> bool:
        t0 = time.perf_counter()
        r = _run_steps(model, opt, step, spec, 1, seq, sr["probe_steps"], device, rss)
        if not r["ok"] and not r["oom"]:
            raise RuntimeError(f"{spec['stack']} at seq {seq} produced a non-finite loss; not a memory limit")
        probes.append(dict(seq_len=seq, ok=r["ok"], oom=r["oom"], cuda_max_allocated=r.get("cuda_max_allocated"),
                           cuda_max_reserved=r.get("cuda_max_reserved"), simulated_peak=r.get("simulated_peak"),
                           seconds=round(time.perf_counter() - t0, 1)))
        print(f"{spec['stack']} seq {seq}: {'fits' if r['ok'] else 'OOM'} ({probes[-1]['seconds']} s)",
              file=sys.stderr, flush=True)
        if r["ok"] and r.get(peak_key):
            points.append((seq, r[peak_key]))
        return r["ok"]

    lo, hi = search_longest(fits, sr["start"], sr["max_seq"], sr["resolution"],
                            predict=lambda: linear_prediction(points, spec["allocator_cap"]))
    return dict(max_seq_len=lo, first_failure=hi, probes=probes)


def child(spec: dict) -> dict:
    """Build one stack in this process, then train each of ``spec['batches']`` (or run ``spec['search']``);
    measurements."""
    import bitsandbytes  # noqa: F401  (every stack imports the same libraries before the RSS baseline)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qlora.train.loop  # noqa: F401

    warnings.filterwarnings("ignore")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    device = torch.device(spec["device"])
    allocator_cap = spec.get("cap_bytes")
    if device.type == "cuda":
        torch.cuda.init()
        # set_per_process_memory_fraction needs an indexed device; "cuda" alone is refused
        device = torch.device("cuda", torch.cuda.current_device())
        if spec.get("cap_bytes"):
            torch.zeros(1, device=device)  # create the CUDA context now, to measure it
            free, total = torch.cuda.mem_get_info(device)
            # The fraction caps only the caching allocator. A card of cap_bytes also holds this
            # process's CUDA context (and library handles), so that much is taken off the cap.
            allocator_cap = spec["cap_bytes"] - (total - free)
            torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, allocator_cap / total)), device)
    rss = PeakRSS()
    rss_imports = rss.rss()
    stack = spec["stack"]
    t_setup = time.perf_counter()
    if stack.startswith("hf"):
        model, opt, step = build_hf(spec, device, upcast=stack == "hf")
    else:
        long = stack in ("qlora-long", "qlora-long-mlp")
        model, opt, step = build_qlora(spec, device, offload=stack == "qlora-offload" or long,
                                       chunked=stack != "qlora-unchunked",
                                       tile_tokens=spec["tile_tokens"] if long else None,
                                       tiled_norms=stack == "qlora-long")
    common = dict(stack=stack, setup_s=round(time.perf_counter() - t_setup, 2), rss_imports=rss_imports,
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  model_bytes_by_dtype=_bytes_by_dtype(model))
    if allocator_cap is not None:
        common["allocator_cap_bytes"] = allocator_cap
    # what loading left cached (transformers' allocator warm-up, freed 16-bit weights) must not
    # count towards the first batch's reserved peak
    _release(opt, device)
    if spec.get("search"):
        return dict(common, **_search(model, opt, step, dict(spec, allocator_cap=allocator_cap), device, rss))
    runs = []
    for batch in spec["batches"]:  # ascending: a later batch reuses the allocator cache of an earlier, smaller one
        r = dict(common, **_run_steps(model, opt, step, spec, batch, spec["seq_len"], spec["steps"], device, rss))
        r["peak_rss_above_imports"] = r["peak_rss"] - rss_imports
        runs.append(r)
        # one line per finished batch: if a later batch crashes or the budget stops this process,
        # bench/train.py keeps the batches already measured
        print(json.dumps(dict(partial_run=r)), flush=True)
    return dict(common, runs=runs)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
