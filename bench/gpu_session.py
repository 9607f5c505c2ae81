"""The Python half of bench/gpu_session.sh (the plan for a lent GPU: docs/gpu-runbook.md).

    python bench/gpu_session.py env --size full --session OUT/gpu-session.json --needs WORK/needs.sh
    python bench/gpu_session.py paged                 # one paged AdamW 8-bit step (CUDA managed memory)
    python bench/gpu_session.py grid --stage 8b --size full --results-dir WORK/results --budget-s 170
    python bench/gpu_session.py part --session ... --name grid8b --status ok --seconds 121 --results-dir ... --out OUT
    python bench/gpu_session.py results DIR           # here, afterwards: returned JSONs -> bench/results/*.json + .md

``env`` records what the machine is and which parts can run (the modules
each part imports); ``grid`` runs bench/memory_accuracy.py's CUDA grid in
the session's order (the Llama-3.1-8B rows first, then the Qwen2.5-7B rows)
under a 24 GiB per-process memory cap, writing after every row; ``part``
records a part's outcome in gpu-session.json and rewrites gpu-session.md
(its status table plus the markdown the parts wrote) and copies the result
JSONs into $OUT. Nothing here imports torch at module level: ``part`` runs
between parts and must cost nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# What each part imports (module names), read off the code and checked by blocking each one in turn;
# a part whose list is not all importable is skipped with the missing names in the log.
REQUIRES = {
    # collection imports quant (bitsandbytes kernels, accelerate's init_empty_weights) and the recipe (pydantic)
    "tests": ("torch", "pytest", "transformers", "safetensors", "yaml", "pydantic", "psutil", "accelerate",
              "bitsandbytes"),
    # qlora train: recipe (pydantic, yaml), data (datasets), loader (accelerate), plan (psutil), plots
    # (matplotlib); bitsandbytes only for the recipe's paged optimizer, swapped for torch AdamW without it
    "train": ("torch", "transformers", "safetensors", "yaml", "pydantic", "datasets", "accelerate", "psutil", "tqdm",
              "matplotlib"),
    # bench/memcheck.py imports qlora.train.loop (pydantic, yaml, safetensors); memory_accuracy imports bitsandbytes
    "grid8b": ("torch", "transformers", "safetensors", "yaml", "pydantic", "bitsandbytes"),
    "grid7b": ("torch", "transformers", "safetensors", "yaml", "pydantic", "bitsandbytes"),
    # bench/train.py + train_stacks.py: the hf stack is transformers + bitsandbytes + peft
    "speed": ("torch", "transformers", "safetensors", "yaml", "pydantic", "bitsandbytes", "peft", "accelerate"),
    "maxctx": ("torch", "transformers", "safetensors", "yaml", "pydantic", "bitsandbytes", "peft", "accelerate"),
    "quantspeed": ("torch", "transformers", "safetensors", "bitsandbytes", "accelerate", "psutil"),
}
# distribution names for the version column (import name -> distribution)
DISTS = {"yaml": "pyyaml", "pytest": "pytest"}
EXTRA_MODULES = ("datasets", "dill", "multiprocess", "fsspec", "pyarrow", "pandas", "xxhash", "huggingface_hub",
                 "tokenizers", "pydantic_core", "typing_extensions", "gguf", "rich", "numpy", "triton")

# bench/memory_accuracy.py CUDA_GRID rows (1-based) per stage; the 8B rows first: they are the ones
# the 24 GB recipes and the README quote
STAGES = {
    "full": {"8b": (1, 2, 3, 4, 5, 11, 12, 13, 15), "7b": (6, 7, 8, 9, 10, 14)},  # 15: packed rows
    # CPU_GRID rows at the tiny size: the same code path (plan, build, two steps, write after each row)
    "tiny": {"8b": (1,), "7b": (7,)},
}
CAP_GIB = 24.0  # the 24 GiB card the 24 GB recipes are planned for

# What comes back from $OUT (the device returns at most 8 files): these result JSONs plus the session's
# log, JSON and markdown. The markdown files the parts write stay in WORK and are folded into gpu-session.md.
RESULT_ORDER = ("memory-accuracy-cuda", "memory-accuracy-cpu", "train-cuda", "train-cpu-tiny", "train-max-context",
                "train-max-context-tiny", "quant-cuda", "quant-cpu-quick")


# ---- small helpers ------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (DISTS.get(module, module), module.replace("_", "-")):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


# ---- env -------------------------------------------------------------------------------


def _probe(module: str) -> dict:
    t0 = time.perf_counter()
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (a broken install is as missing as an absent one)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return {"ok": True, "version": getattr(m, "__version__", None) or _version(module),
            "file": str(getattr(m, "__file__", "") or ""), "import_s": round(time.perf_counter() - t0, 2)}


def _nvidia_smi() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {type(e).__name__}: {e}"


def cmd_env(args) -> int:
    """Facts about the machine, what imports, and which parts can run (SKIP_<part>=reason lines for the shell)."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "size": args.size, "python": platform.python_version(), "executable": sys.executable,
           "platform": platform.platform(), "cpus": os.cpu_count(), "nvidia_smi": _nvidia_smi(),
           "pythonpath": os.environ.get("PYTHONPATH", "")}
    try:
        env["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    modules = {}
    for name in dict.fromkeys([m for req in REQUIRES.values() for m in req] + list(EXTRA_MODULES)):
        modules[name] = _probe(name)
    ours = {}
    for name in ("quant", "memory", "layers", "qlora", "qlora.train.loop"):
        r = _probe(name)
        if r["ok"]:
            r["from_this_tree"] = Path(r["file"]).resolve().is_relative_to(ROOT)
        ours[name] = r
    cuda = {"available": False}
    if modules["torch"]["ok"]:
        import torch

        cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
        if cuda["available"]:
            free, total = torch.cuda.mem_get_info()
            p = torch.cuda.get_device_properties(0)
            cuda.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                        total_bytes=total, free_bytes_after_init=free, context_bytes=total - free,
                        multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    if modules["bitsandbytes"]["ok"]:
        try:
            import bitsandbytes.cextension as ce

            lib = getattr(ce, "lib", None)
            env["bitsandbytes_native"] = {"backend": str(getattr(ce, "BNB_BACKEND", "?")),
                                          "library": type(lib).__name__,
                                          "compiled_with_cuda": getattr(lib, "compiled_with_cuda", None)}
        except Exception as e:  # noqa: BLE001
            env["bitsandbytes_native"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    env.update(modules=modules, ours=ours, cuda=cuda)

    skip = {}
    for part, req in REQUIRES.items():
        missing = [m for m in req if not modules[m]["ok"]]
        bad_ours = [n for n, r in ours.items() if not r["ok"]]
        if bad_ours:
            skip[part] = f"our packages do not import: {', '.join(bad_ours)} ({ours[bad_ours[0]]['error']})"
        elif missing:
            skip[part] = f"missing modules: {', '.join(missing)} (carry their wheels in .whl/: docs/gpu-runbook.md)"
        elif args.size == "full" and not cuda["available"]:
            skip[part] = "SIZE=full needs a CUDA GPU and torch sees none (SIZE=tiny runs the CPU dry run)"
    env["skip"] = skip

    session = _load_json(Path(args.session))
    session.update(environment=env, parts=session.get("parts", []))
    _write_json(Path(args.session), session)
    with open(args.needs, "w") as f:
        for part in REQUIRES:
            f.write(f"SKIP_{part}={_shell_quote(skip.get(part, ''))}\n")
        f.write(f"HAVE_CUDA={1 if cuda['available'] else 0}\n")
        f.write(f"HAVE_BNB={1 if modules['bitsandbytes']['ok'] else 0}\n")
    # the log: one line per fact that decides something
    print(f"python {env['python']} ({sys.executable}); {env['cpus']} CPUs; {env.get('mem_total_gib', '?')} GiB RAM")
    print(f"nvidia-smi: {env['nvidia_smi']}")
    if cuda["available"]:
        print(f"torch sees {cuda['name']} (sm_{cuda['capability'][0]}{cuda['capability'][1]}, "
              f"{cuda['total_bytes'] / 2**30:.1f} GiB, CUDA context {cuda['context_bytes'] / 2**20:.0f} MiB), "
              f"torch CUDA {cuda['torch_cuda']}")
    else:
        print(f"torch sees no CUDA GPU (torch CUDA build: {cuda.get('torch_cuda')})")
    for name, r in modules.items():
        print(f"  {name:18s} " + (f"{r['version']}  {r['file']}" if r["ok"] else f"NOT IMPORTABLE: {r['error']}"))
    for name, r in ours.items():
        print(f"  {name:18s} " + (f"{r['file']}" + ("" if r["from_this_tree"] else "  (NOT this tree)")
                                  if r["ok"] else f"NOT IMPORTABLE: {r['error']}"))
    if "bitsandbytes_native" in env:
        print(f"bitsandbytes native library: {env['bitsandbytes_native']}")
    for part, why in skip.items():
        print(f"will skip {part}: {why}")
    return 0


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# ---- paged optimizer smoke ---------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cmd_paged(args) -> int:
    """One PagedAdamW8bit step on a 1e6-element parameter: bitsandbytes' paged state is CUDA managed memory,
    which can hang a GPU where it is unsupported, so this runs first, under a short timeout.

    Also measures what memory/host.py's ``PROCESS_BYTES`` stands for: the resident memory of a trainer
    process before its model (after importing torch, transformers, bitsandbytes, datasets and
    qlora.train.loop), and again once CUDA and cuBLAS are initialised.
    """
    import bitsandbytes as bnb
    import torch
    import transformers  # noqa: F401

    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    import qlora.train.loop  # noqa: F401

    rss = {"imports": _rss()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    (a @ a).sum().item()  # the device's math library is loaded now
    rss["device_initialised"] = _rss()
    p = torch.nn.Parameter(torch.randn(1000, 1000, device=dev))
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    if dev == "cuda":
        torch.cuda.synchronize()
    moved = float((p.detach() - before).abs().max())
    rss["after_paged_step"] = _rss()
    print(f"paged AdamW 8-bit step on {dev}: {'ok' if moved > 0 else 'NO UPDATE'} (max update {moved:.2e}); "
          f"process RSS {rss['imports'] / 2**20:.0f} MiB after imports, "
          f"{rss['device_initialised'] / 2**20:.0f} MiB with {dev} initialised (memory/host.py PROCESS_BYTES)")
    if args.session:
        session = _load_json(Path(args.session))
        session.setdefault("environment", {})["process_rss_bytes"] = dict(rss, device=dev)
        _write_json(Path(args.session), session)
    return 0 if moved > 0 else 1


# ---- memory grid -------------------------------------------------------------------


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "ALLOC_FAILED" in str(e)


def cmd_grid(args) -> int:
    """bench/memory_accuracy.py's grid, one stage, in this process; results merged into one JSON after every row.

    On CUDA each row first runs under a per-process memory cap of a 24 GiB card
    (``set_per_process_memory_fraction`` of 24 GiB minus this process's CUDA
    context), so ``max_memory_reserved`` is what a 24 GiB card's allocator
    would hold; a row that runs out of memory there is recorded
    (``fits_24gib: false``) and measured again without the cap.
    """
    import memory_accuracy as ma
    import torch

    t_end = time.monotonic() + args.budget_s
    device = "cuda" if args.size == "full" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("grid: SIZE=full needs a CUDA GPU", file=sys.stderr)
        return 2
    grid = ma.CUDA_GRID if device == "cuda" else ma.CPU_GRID
    order = STAGES[args.size][args.stage]
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory-accuracy-{device}.json"
    old = _load_json(path)
    rows = {r["grid_row"]: r for r in old.get("rows", []) if "grid_row" in r}
    failed = {f["row"]: f for f in old.get("failed", [])}
    env = old.get("environment") or ma._environment(device)
    cap = None
    if device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context exists now: measure it
        free, total = torch.cuda.mem_get_info()
        cap = int(CAP_GIB * 2**30) - (total - free)
        env.update(cap_bytes=int(CAP_GIB * 2**30), cap_allocator_bytes=cap, context_bytes_at_start=total - free)
        print(f"grid: rows under a {CAP_GIB:g} GiB cap (allocator {cap / 2**30:.2f} GiB after a "
              f"{(total - free) / 2**20:.0f} MiB context)", flush=True)
    else:
        print("grid: on the CPU (tiny size): no memory cap (set_per_process_memory_fraction is CUDA-only)", flush=True)
    swap = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"} if args.no_paged else {}
    if swap:
        print("grid: the paged-optimizer check failed, so paged optimizers are replaced by their unpaged "
              "bitsandbytes versions (prediction and measurement alike)", flush=True)

    def save() -> None:
        done = sorted(rows.values(), key=lambda r: r["grid_row"])
        measured = set(rows) | set(failed)
        not_run = [i for stage in STAGES[args.size].values() for i in stage if i not in measured]
        ma.write_results(out_dir, device, env, done, not_run, sorted(failed.values(), key=lambda f: f["row"]))
        data = _load_json(path)
        data["command"] = (f"python bench/gpu_session.py grid --size {args.size} (bench/memory_accuracy.py's "
                           f"{'CUDA' if device == 'cuda' else 'CPU'}_GRID rows, 8B rows first"
                           + (f", each under a {CAP_GIB:g} GiB per-process cap first)" if cap else ")"))
        _write_json(path, data)
        if cap:
            _append_cap_section(path.with_suffix(".md"), done)

    last_s = 20.0 if device == "cuda" else 15.0  # the first row also pays for the planner's profile
    for i in order:
        name, settings = grid[i - 1]
        settings = dict(settings, **({"optimizer": swap[settings["optimizer"]]}
                                     if settings.get("optimizer") in swap else {}))
        left = t_end - time.monotonic()
        if left < 1.3 * last_s:
            print(f"grid row {i}: not started ({left:.0f} s left, the last row took {last_s:.0f} s)", flush=True)
            continue
        t0 = time.monotonic()
        row, err, fits = None, None, None
        for capped in ([True, False] if cap else [False]):
            if cap:
                torch.cuda.set_per_process_memory_fraction(cap / total if capped else 1.0)
            try:
                row = ma.run_row(name, settings, device)
            except Exception as e:  # noqa: BLE001  (one broken row must not cost the others)
                err = e
            finally:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            if row is not None:
                fits = capped if cap else None
                break
            oom = _is_oom(err)
            msg = f"{type(err).__name__}: {err}"[:2000]
            err = None  # drop the traceback (it holds the failed step's tensors) before the next try
            if not (capped and oom):
                failed[i] = dict(row=i, model=name, settings=settings, error=msg)
                break
            print(f"grid row {i}: out of memory under the {CAP_GIB:g} GiB cap; measuring it again uncapped", flush=True)
        if cap:
            torch.cuda.set_per_process_memory_fraction(1.0)
        last_s = time.monotonic() - t0
        if row is None:
            print(f"grid row {i} {name} {settings}: FAILED: {failed[i]['error'].splitlines()[0][:300]}", flush=True)
        else:
            failed.pop(i, None)
            row.update(grid_row=i, fits_24gib=fits)
            rows[i] = row
            extra = ""
            if device == "cuda":
                extra = (f"; reserved {row['reserved_bytes'] / 2**30:.2f} GiB, "
                         f"{'fits' if fits else 'DOES NOT FIT'} under {CAP_GIB:g} GiB")
            print(f"grid row {i:2d} {row['model']:<14} {settings} predicted {row['predicted_bytes'] / 2**20:9.1f} MiB "
                  f"measured {row['measured_bytes'] / 2**20:9.1f} MiB {100 * row['error']:+.2f}%{extra} "
                  f"({last_s:.0f} s)", flush=True)
        save()
    done = [rows[i] for i in order if i in rows]
    if done:
        errs = [abs(r["error"]) for r in done]
        print(f"grid stage {args.stage}: {len(done)}/{len(order)} rows, |error| max {100 * max(errs):.2f}%, "
              f"mean {100 * sum(errs) / len(errs):.2f}%", flush=True)
    if any(i in failed for i in order):
        return 1
    return 0 if done else 3  # 3: no row started (the budget), which the shell reports as no-time


def _append_cap_section(md: Path, rows: list[dict]) -> None:
    """What the 24 GiB card would have seen, below memory_accuracy's own table (which knows nothing of the cap)."""
    lines = ["", f"## Under a {CAP_GIB:g} GiB card's cap (torch.cuda.set_per_process_memory_fraction)", "",
             "Each row ran first with the caching allocator capped at 24 GiB minus the process's CUDA context; "
             "'max reserved' is the allocator's peak there.", "",
             "| grid row | model | predicted device total GiB | max reserved GiB | outside allocator MiB | "
             "fits under the cap |", "|---:|---|---:|---:|---:|---|"]
    for r in rows:
        fits = {True: "yes", False: "NO: out of memory (measured again uncapped)"}.get(r.get("fits_24gib"), "-")
        lines.append(f"| {r.get('grid_row', '-')} | {r['model']} | {r['predicted_device_total_bytes'] / 2**30:.2f} | "
                     f"{r['reserved_bytes'] / 2**30:.2f} | {r['outside_allocator_bytes'] / 2**20:.0f} | {fits} |")
    md.write_text(md.read_text() + "\n".join(lines) + "\n")


# ---- part bookkeeping and the session report ----------------------------------------


def _pytest_summary(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        s = line.strip("= ").strip()
        if " in " in s and any(w in s for w in ("passed", "failed", "error", "skipped")):
            return s
    return None


def _metrics_tail(path: Path, n: int = 3) -> list[dict]:
    try:
        recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.startswith("{")]
    except (OSError, ValueError):
        return []
    steps = [r for r in recs if "loss" in r][-n:]
    evals = [r for r in recs if "eval_loss" in r][-1:]
    return steps + [r for r in evals if r not in steps]


def cmd_part(args) -> int:
    """Record one part's outcome; rewrite gpu-session.md; copy the result JSONs into $OUT."""
    session_path = Path(args.session)
    session = _load_json(session_path)
    rec = {"part": args.name, "status": args.status, "seconds": args.seconds, "note": args.note}
    if args.pytest_log:
        rec["pytest"] = _pytest_summary(Path(args.pytest_log))
    if args.metrics:
        rec["metrics_tail"] = _metrics_tail(Path(args.metrics))
    session["parts"] = [p for p in session.get("parts", []) if p["part"] != args.name] + [rec]
    session["elapsed_s"] = args.elapsed
    res_dir, out = Path(args.results_dir), Path(args.out)
    copied = []
    for f in sorted(res_dir.glob("*.json")):
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    session["result_files"] = copied
    _write_json(session_path, session)
    _write_session_md(session, res_dir, out / "gpu-session.md")
    return 0


def _write_session_md(session: dict, res_dir: Path, path: Path) -> None:
    env = session.get("environment", {})
    cuda = env.get("cuda", {})
    mods = env.get("modules", {})
    vers = ", ".join(f"{m} {mods[m].get('version')}" for m in ("torch", "transformers", "peft", "bitsandbytes")
                     if mods.get(m, {}).get("ok"))
    hw = cuda.get("name") or "no CUDA GPU"
    L = [f"# GPU session ({env.get('size', '?')} size): {hw}", "",
         f"{env.get('date', '?')}; python {env.get('python', '?')}; {vers}; torch CUDA {cuda.get('torch_cuda')}; "
         f"nvidia-smi: {env.get('nvidia_smi', '?')}", "",
         f"Elapsed {session.get('elapsed_s', '?')} s. Plan and budgets: docs/gpu-runbook.md.", "",
         "| part | status | seconds | note |", "|---|---|---:|---|"]
    for p in session.get("parts", []):
        note = p.get("note") or ""
        if p.get("pytest"):
            note = (note + "; " if note else "") + p["pytest"]
        if p.get("metrics_tail"):
            last = [r for r in p["metrics_tail"] if "loss" in r][-1:]
            if last:
                r = last[0]
                note += (f"{'; ' if note else ''}step {r.get('step')} loss {r.get('loss', 0):.4f}, "
                         f"peak {r.get('peak_bytes', 0) / 2**20:.0f} MiB ({r.get('peak_kind')}) vs predicted "
                         f"{r.get('predicted_peak_bytes', 0) / 2**20:.0f} MiB")
        L.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {note.replace('|', '/')} |")
    for stem in RESULT_ORDER:
        md = res_dir / f"{stem}.md"
        if md.exists():
            body = md.read_text().replace("\n# ", "\n## ")
            L += ["", "---", "", "#" + body if body.startswith("# ") else body]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L) + "\n")
    tmp.replace(path)


# ---- afterwards, on the CPU machine: returned files -> bench/results ---------------


def cmd_results(args) -> int:
    """Copy the session's CUDA result JSONs into bench/results and write each one's markdown with the
    renderer of the script that produced it; then re-render docs/memory-accuracy.md."""
    src = Path(args.dir)
    dest = Path(args.into)
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    session = _load_json(src / "gpu-session.json")
    gpu = session.get("environment", {}).get("cuda", {}).get("name")
    if gpu:  # the session's own record, named for the GPU: gpu-session-h200.json/.md
        slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
        for ext in ("json", "md"):
            if (src / f"gpu-session.{ext}").exists():
                shutil.copyfile(src / f"gpu-session.{ext}", dest / f"gpu-session-{slug}.{ext}")
        print(f"wrote {dest}/gpu-session-{slug}.json and .md")
    for f in sorted(src.glob("*.json")):
        stem = f.stem
        if stem not in ("memory-accuracy-cuda", "train-cuda", "train-max-context", "quant-cuda"):
            print(f"skipped {f.name} (not a CUDA result)")
            continue
        data = json.loads(f.read_text())
        if stem == "memory-accuracy-cuda":
            import memory_accuracy as ma

            ma.write_results(dest, "cuda", data["environment"], data["rows"], data.get("not_run", []),
                             data.get("failed", []))
            shutil.copyfile(f, dest / f.name)  # the session's own JSON (its command line and grid_row fields)
            if data["environment"].get("cap_bytes"):
                _append_cap_section(dest / f"{stem}.md", data["rows"])
        elif stem.startswith("train-"):
            import train

            shutil.copyfile(f, dest / f.name)
            train.write_markdown(dest / f"{stem}.md", data)
        else:
            import quant_speed

            shutil.copyfile(f, dest / f.name)
            quant_speed.write_markdown(dest / f"{stem}.md", data)
        done.append(stem)
        print(f"wrote {dest / f.name} and {stem}.md")
    if "memory-accuracy-cuda" in done and dest.resolve() == (BENCH / "results").resolve():
        import memory_accuracy as ma

        ma.render_docs()
        print(f"re-rendered {ma.DOCS}")
    return 0 if done else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env", help="machine facts, importable modules, parts that can run")
    p.add_argument("--size", choices=("tiny", "full"), required=True)
    p.add_argument("--session", required=True, help="gpu-session.json to write")
    p.add_argument("--needs", required=True, help="shell file of SKIP_<part>= lines to write")
    p = sub.add_parser("paged", help="one paged AdamW 8-bit step; the process's resident memory")
    p.add_argument("--session", help="gpu-session.json to add the RSS figures to")
    p = sub.add_parser("grid", help="one stage of the memory-accuracy grid")
    p.add_argument("--stage", choices=("8b", "7b"), required=True)
    p.add_argument("--size", choices=("tiny", "full"), required=True)
    p.add_argument("--results-dir", required=True)
    p.add_argument("--budget-s", type=float, default=600.0, help="start no row that would not end by then")
    p.add_argument("--no-paged", action="store_true", help="replace paged optimizers by unpaged ones")
    p = sub.add_parser("part", help="record a part's outcome, rewrite gpu-session.md, copy results to OUT")
    p.add_argument("--session", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--note", default="")
    p.add_argument("--pytest-log")
    p.add_argument("--metrics")
    p.add_argument("--results-dir", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("results", help="returned files -> bench/results/*.json + .md (run on the CPU machine)")
    p.add_argument("dir", help="the folder the device tool returned $OUT's files in")
    p.add_argument("--into", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    return {"env": cmd_env, "paged": cmd_paged, "grid": cmd_grid, "part": cmd_part, "results": cmd_results}[
        args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
