"""Measure the logit error of `qlora merge --into original` vs `--into dequantized`.

    .venv/bin/python bench/merge_error.py            # writes bench/results/merge-error-cpu.json

The question users ask: after QLoRA training, merge the adapter into the
original 16-bit weights, or into the dequantized NF4 weights it was trained
against? This script answers it on a model small enough for a CPU:

1. A random-init Llama-style model (4 layers, hidden 256, vocab 2048) is saved
   as a bf16 checkpoint. No download: the weights are N(0, 0.02) as
   transformers initializes them.
2. The QLoRA model is built exactly as training builds it (NF4, double quant,
   blocksize 64, bf16 compute) with a rank-16 all-linear bf16 adapter whose B
   is random and rescaled per module so that ‖s·B·A‖_F / ‖W0‖_F equals a set
   ratio (0.02 and 0.1): a non-trivial adapter of a controlled size.
3. `merge_checkpoint` (the code behind `qlora merge`) writes both merged
   checkpoints in bf16 and, to separate the final rounding, in float32; each is
   loaded with plain transformers.
4. Each merged model's logits on a fixed batch (8 x 128 random tokens) are
   compared with the unmerged QLoRA model (NF4 base + adapter), in its bf16
   training precision and in float32 (same NF4 codes, fp32 compute and
   adapter: the exact function the adapter defines).

Metrics per comparison: max and mean |Δlogit|, relative RMS error
(rms(Δ)/rms(reference logits)), mean KL(reference ‖ merged) of the next-token
distributions in nats, and top-1 agreement. Findings, not pass/fail.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def _model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _qlora_model(base_dir: Path, adapter_dir: Path | None, dtype: torch.dtype):
    """NF4 base (nf4, double quant, blocksize 64) with compute in ``dtype`` (+ the adapter in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    from qlora.adapters.files import load_adapter
    from quant import quantize_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    quantize_model(model, "nf4", 64, True, compute_dtype=dtype)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, dtype=dtype)
    return model.eval()


@torch.no_grad()
def _make_adapter(base_dir: Path, out: Path, ratio: float, seed: int) -> dict:
    from qlora.adapters.files import save_adapter
    from qlora.lora.diagnostics import lora_diagnostics, update_norm
    from qlora.lora.surgery import apply_lora, lora_modules

    model = _qlora_model(base_dir, None, torch.bfloat16)
    torch.manual_seed(seed)
    apply_lora(model, "all-linear", rank=16, alpha=32.0)  # bf16 adapter: the training default
    for _, m in lora_modules(model):
        m.lora_B.weight.normal_()
        w0 = m.base_layer.dequantize(torch.float32).norm().item()
        m.lora_B.weight.mul_(ratio * w0 / update_norm(m))
    save_adapter(model, out)
    got = [d.update_ratio for d in lora_diagnostics(model)]
    return {"update_ratio_min": min(got), "update_ratio_max": max(got), "modules": len(got)}


@torch.no_grad()
def _logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits.float()


def _compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    d = got - ref
    logp_ref, logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return {
        "max_abs": d.abs().max().item(),
        "mean_abs": d.abs().mean().item(),
        "rel_rms": (d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(),
        "kl_mean": kl.mean().item(),
        "top1_agree": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.02, 0.1], help="adapter-to-base norm ratios")
    p.add_argument("--out", type=Path, default=RESULTS / "merge-error-cpu.json")
    args = p.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM

    from qlora.adapters.merging import merge_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t0 = time.perf_counter()
    x = torch.randint(3, 2048, (8, 128), generator=torch.Generator().manual_seed(1))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_dir = tmp / "base"
        AutoModelForCausalLM.from_config(_model_config()).to(torch.bfloat16).save_pretrained(base_dir)
        base16 = _logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval(), x)
        base_nf4 = _logits(_qlora_model(base_dir, None, torch.float32), x)
        for i, ratio in enumerate(args.ratios):
            ad = tmp / f"adapter-{i}"
            info = _make_adapter(base_dir, ad, ratio, seed=10 + i)
            refs = {
                "qlora_bf16": _logits(_qlora_model(base_dir, ad, torch.bfloat16), x),
                "qlora_fp32": _logits(_qlora_model(base_dir, ad, torch.float32), x),
            }
            rows = [
                {"model": "QLoRA bf16 (training precision)", "vs": "qlora_fp32",
                 **_compare(refs["qlora_fp32"], refs["qlora_bf16"])},
                {"model": "NF4 base, no adapter (the adapter's own effect)", "vs": "qlora_fp32",
                 **_compare(refs["qlora_fp32"], base_nf4)},
                {"model": "16-bit base, no adapter", "vs": "qlora_fp32", **_compare(refs["qlora_fp32"], base16)},
            ]
            for into in ("dequantized", "original"):
                for dt in ("bfloat16", "float32"):
                    out = tmp / f"merged-{i}-{into}-{dt}"
                    merge_checkpoint(base_dir, ad, out, into=into, dtype=dt)
                    merged = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dt)).eval(), x)
                    for ref_name, ref in refs.items():
                        rows.append({"model": f"merged --into {into} ({dt})", "vs": ref_name, **_compare(ref, merged)})
            runs.append({"update_ratio": ratio, "adapter": info, "rows": rows})
    result = {
        "what": "logit error of merged checkpoints vs the unmerged QLoRA model (NF4 base + adapter)",
        "command": ".venv/bin/python bench/merge_error.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "model": "random-init Llama-style: 4 layers, hidden 256, intermediate 688, 8 heads (4 kv), vocab 2048, "
                 "bf16 checkpoint",
        "quantization": "nf4, double quant, blocksize 64, lm_head kept 16-bit",
        "adapter": "all-linear, r=16, alpha=32, bf16, A Kaiming-uniform, "
                   "B random rescaled to the given ||sBA||_F/||W0||_F per module",
        "batch": "8 x 128 random token ids (seed 1)",
        "seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"\n||sBA||/||W0|| = {run['update_ratio']}")
        print("| model | vs | max abs | mean abs | rel RMS | KL (nats) | top-1 agree |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in run["rows"]:
            print(
                f"| {r['model']} | {r['vs']} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['rel_rms']:.2e} | "
                f"{r['kl_mean']:.2e} | {100 * r['top1_agree']:.2f}% |"
            )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
