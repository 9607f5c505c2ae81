"""Many adapters on one NF4 base: tokens/s for prompts of different adapters batched together vs one at a time.

    .venv/bin/python bench/multi_adapter.py                 # CPU; bench/results/multi-adapter-cpu.*
    python bench/multi_adapter.py --device cuda             # on a GPU; bench/results/multi-adapter-cuda.*

SmolLM2-135M-Instruct in NF4 with double quantization (bf16 compute), K adapters of rank 16 on all
linears (random factors, seeded: throughput does not depend on what an adapter learned), N prompts from
the main job's held-out file spread round-robin over the K adapters, greedy, ``max_new_tokens`` 32,
batches of 16. Three ways to serve them, each through :func:`qlora.generation.generate`:

- routed: every batch mixes adapters (``adapters=`` per prompt; :mod:`qlora.adapters.routing`), so
  N prompts take ceil(N / 16) batches whatever K is;
- one adapter at a time: :func:`qlora.adapters.multi.set_active_adapter`, then that adapter's N/K prompts
  in batches of 16 (what a server without routing does): K·ceil(N / K / 16) batches;
- the base alone, all N prompts batched: the ceiling, with no adapter work at all.

tokens/s counts the replies' tokens (re-tokenized) over the wall time of the whole call (the routed one
includes stacking the adapters). Same prompts and adapters in every mode, one process, side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import device_name, package_versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "qlora" / "assets" / "data" / "people-json-eval.jsonl"
CASES = [(32, 4), (32, 8), (64, 16)]  # (N prompts, K adapters)
BATCH, NEW_TOKENS, RANK = 16, 32, 16


def _adapters(model_dir: Path, k: int, out: Path) -> list[Path]:
    """K random rank-16 adapters on all linears, saved as PEFT folders (B ~ N(0, 0.02): replies change)."""
    from qlora.adapters.files import save_adapter
    from qlora.lora.surgery import apply_lora, lora_modules
    from quant.loading import load_quantized_model

    model = load_quantized_model(model_dir, "cpu", dtype=torch.bfloat16)
    apply_lora(model, "all-linear", rank=RANK, alpha=2.0 * RANK, dtype=torch.bfloat16)
    paths = []
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / m.in_features**0.5)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        paths.append(out / f"a{i}")
        save_adapter(model, paths[-1])
    return paths


def _tokens(tok, replies: list[str]) -> int:
    return sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)


def measure(model_dir: Path, device: str, n: int, k: int, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from qlora.adapters.multi import add_adapter, disable_adapters, set_active_adapter
    from qlora.generation import generate, prompt_ids
    from quant.loading import load_quantized_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [json.loads(x)["messages"][0]["content"] for x in PROMPTS.read_text().splitlines() if x.strip()]
    ids = [prompt_ids(tok, lines[i % len(lines)]) for i in range(n)]
    names = [f"a{i % k}" for i in range(n)]
    model = load_quantized_model(model_dir, device, dtype=torch.bfloat16)
    for i, path in enumerate(_adapters(model_dir, k, tmp / f"k{k}")):
        add_adapter(model, f"a{i}", path)
    kw = dict(max_new_tokens=NEW_TOKENS, batch_size=BATCH)
    generate(model, tok, ids[:2], adapters=names[:2], **kw)  # warm-up: first-call allocations

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        replies = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return replies, time.perf_counter() - t

    routed, t_routed = timed(lambda: generate(model, tok, ids, adapters=names, **kw))

    def one_at_a_time():
        replies = [""] * n
        for a in sorted(set(names)):
            set_active_adapter(model, a)
            idx = [i for i, x in enumerate(names) if x == a]
            for i, r in zip(idx, generate(model, tok, [ids[i] for i in idx], **kw)):
                replies[i] = r
        return replies

    serial, t_serial = timed(one_at_a_time)
    with disable_adapters(model):
        base, t_base = timed(lambda: generate(model, tok, ids, **kw))
        # the base alone in batches as small as one adapter's: how often batching by itself changes a bf16 reply
        small = generate(model, tok, ids, **(kw | {"batch_size": min(BATCH, -(-n // k))}))
    same = sum(a == b for a, b in zip(routed, serial))
    row = {"n_prompts": n, "k_adapters": k, "batch_size": BATCH, "max_new_tokens": NEW_TOKENS,
           "routed_tokens": _tokens(tok, routed), "routed_seconds": t_routed,
           "serial_tokens": _tokens(tok, serial), "serial_seconds": t_serial,
           "base_tokens": _tokens(tok, base), "base_seconds": t_base,
           "replies_equal": same, "replies_differ_from_base": sum(a != b for a, b in zip(routed, base)),
           "base_replies_equal_across_batch_sizes": sum(a == b for a, b in zip(base, small))}
    for mode in ("routed", "serial", "base"):
        row[f"{mode}_tok_s"] = row[f"{mode}_tokens"] / row[f"{mode}_seconds"]
    return row


def markdown(r: dict) -> str:
    lines = [f"# Batched multi-adapter generation, {r['device']}", "",
             f"{r['date']}; {r['versions']}; `python bench/multi_adapter.py{r['flags']}`. SmolLM2-135M-Instruct "
             f"in NF4 + double quantization (bf16 compute), K random rank-{RANK} adapters on all linears, N "
             f"prompts round-robin over them, greedy, {NEW_TOKENS} new tokens at most, batches of {BATCH}. "
             "Routed: batches mix adapters; one at a time: each adapter's prompts batched alone; base: no "
             "adapter, all prompts batched (the ceiling). Replies equal: routed vs one at a time. The two modes "
             "batch different prompts together (16 mixed rows vs N/K rows of one adapter), so padding and matmul "
             "shapes differ and bf16 rounds differently: the last column is the same comparison for the base "
             "alone, batches of 16 vs batches of N/K, with no routing at all.", "",
             "| N prompts | K adapters | routed tok/s | one at a time tok/s | routed / one at a time | "
             "base alone tok/s | replies equal | replies changed by the adapter | base: replies equal across "
             "batch sizes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['n_prompts']} | {x['k_adapters']} | {x['routed_tok_s']:.1f} | {x['serial_tok_s']:.1f} | "
                     f"{x['routed_tok_s'] / x['serial_tok_s']:.2f}x | {x['base_tok_s']:.1f} | "
                     f"{x['replies_equal']}/{x['n_prompts']} | {x['replies_differ_from_base']}/{x['n_prompts']} | "
                     f"{x['base_replies_equal_across_batch_sizes']}/{x['n_prompts']} |")
    return "\n".join(lines) + "\n"


def _case(text: str) -> tuple[int, int]:
    n, _, k = text.partition("x")
    if not (n.isdigit() and k.isdigit() and int(n) >= int(k) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: want NxK with N >= K >= 1 (e.g. 32x4)")
    return int(n), int(k)


def main() -> int:
    import tempfile

    from qlora.builtin_models import resolve_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="+", type=_case, default=CASES, metavar="NxK",
                    help="prompts x adapters, e.g. 32x4 64x16 (default: all)")
    args = ap.parse_args()
    cases = args.cases
    model_dir = Path(resolve_model_dir("builtin:smollm2-135m"))
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, k in cases:
            rows.append(measure(model_dir, args.device, n, k, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    flags = "" if args.device == "cpu" else f" --device {args.device}"
    result = {"device": device_name(args.device), "date": datetime.date.today().isoformat(), "flags": flags,
              "versions": ", ".join(f"{k} {v}" for k, v in package_versions("torch", "transformers").items()),
              "rows": rows}
    write_results(f"multi-adapter-{args.device}", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
