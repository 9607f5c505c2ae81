"""How much of the 4-bit error each LoRA init leaves, on a real model (SmolLM2-135M, NF4 + double quant).

    .venv/bin/python bench/init_error.py           # ~2-3 minutes on 2 cores

Writes bench/results/init-error-cpu.json and .md. For each init, the model is loaded in NF4 from its bf16
checkpoint, LoRA (rank 16, alpha 32, all linears, float32 adapters) is applied and initialized, and over every
adapted linear we measure the relative Frobenius error of what the layer computes at step 0 against the
original bf16 weight:

    error = ||Q + s·B0·A0 - W||_F / ||W||_F        (summed over layers before the ratio)

where ``Q`` is the dequantized 4-bit base. For kaiming/gaussian (B0 = 0) that is NF4's own error. For
PiSSA, OLoRA and LoftQ it is also exactly what separates the trained model from its saved adapter applied to
the original base ``W`` (qlora saves ``[A; A0]``, ``[B, -B0]``: see qlora/lora/inits.py), whatever the
training did. Time is the init alone (SVD/QR and re-quantization), wall clock on this machine.

A second table measures what one layer's init holds on top of the model (:func:`init_transient`: live tensors,
memory.tracker), as a multiple of the layer's float32 weight, next to the planner's
``memory.terms.INIT_TRANSIENT``; tests/qlora/test_lora_inits.py checks the same within 5%.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import device_name, package_versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INITS = [("kaiming", {}), ("pissa", {}), ("pissa", {"pissa_niter": 4}), ("olora", {}), ("loftq", {"loftq_iters": 1}),
         ("loftq", {"loftq_iters": 2}), ("loftq", {"loftq_iters": 4}), ("nonzero", {})]


def measure(model_dir: Path, init: str, kw: dict, rank: int = 16, alpha: float = 32.0) -> dict:
    from layers import base_weight
    from qlora.lora.inits import init_from_weights
    from qlora.lora.surgery import apply_lora, lora_modules
    from quant.checkpoint import Checkpoint
    from quant.loading import load_quantized_model

    torch.manual_seed(0)
    model = load_quantized_model(model_dir, "cpu", dtype=torch.bfloat16)
    apply_lora(model, "all-linear", rank, alpha, dtype=torch.float32)
    t0 = time.perf_counter()
    if init != "kaiming":
        init_from_weights(model, init, model_dir, **kw)
    seconds = time.perf_counter() - t0
    ckpt, num, den = Checkpoint(model_dir), 0.0, 0.0
    for name, layer in lora_modules(model):
        w = ckpt.get(f"{name}.weight").float()
        eff = base_weight(layer.base_layer, torch.float32) + layer.delta_weight()
        num += float(((eff - w) ** 2).sum())
        den += float((w**2).sum())
    label = init + "".join(f", {k} {v}" for k, v in kw.items())
    return {"init": label, "error": (num / den) ** 0.5, "init_seconds": seconds}


SHAPES = [(1536, 576), (576, 1536), (512, 256)]  # SmolLM2-135M's MLP up/down projections, and a small one


def init_transient(init: str, out: int, inp: int, rank: int = 16) -> int:
    """Peak bytes one ``(out, inp)`` NF4 layer's init holds beyond the layer and its weight (memory.tracker)."""
    from torch import nn

    from layers import LoRALinear
    from layers.inits import loftq, nonzero, olora, pissa
    from memory.tracker import LiveTensorTracker
    from qlora.lora.inits import _roundtrip
    from quant import NF4Linear

    torch.manual_seed(0)
    lin = nn.Linear(inp, out, bias=False).to(torch.bfloat16)
    layer = LoRALinear(NF4Linear.from_linear(lin), rank, 2.0 * rank, dtype=torch.float32)
    w = lin.weight.detach()
    tracker = LiveTensorTracker("cpu")
    with tracker:
        tracker.track([*layer.parameters(), *layer.buffers(), w])
        start = tracker.current
        wf = w.to(torch.float32)
        if init == "loftq":
            a, b, base = loftq(wf, rank, 2.0, _roundtrip(layer), 2)
        elif init == "nonzero":
            a, b, base = nonzero(wf, rank, 2.0)
        else:
            a, b, base = (pissa if init == "pissa" else olora)(wf, rank, 2.0)
        layer.install(a, b, 2.0 * rank, trainable=True, dtype=torch.float32)
        layer.rebase(base)
        del wf, a, b, base
    return tracker.peak - start


def markdown(r: dict) -> str:
    base = r["rows"][0]["error"]
    lines = [f"# The 4-bit error each LoRA init leaves, {r['device']}", "",
             f"{r['date']}; {r['versions']}; `python bench/init_error.py`. SmolLM2-135M-Instruct (bf16 checkpoint) in "
             "NF4 with double quantization, LoRA rank 16, alpha 32 on all linears (210 layers). Error: relative "
             "Frobenius error of base + s·B0·A0 against the bf16 weights at step 0, which is also what separates a "
             "trained model from its saved adapter on the original base.", "",
             "| init | relative error | vs NF4 alone | init time (s) |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['init']} | {row['error']:.5f} | {row['error'] / base:.3f}x | {row['init_seconds']:.1f} |")
    lines += ["", "## One layer's init memory (NF4 base, rank 16; LoftQ with 2 iterations)", "",
              "| init | layer (out x in) | measured / float32 weight | planner (memory.terms.INIT_TRANSIENT) |",
              "|---|---|---|---|"]
    for t in r["transient"]:
        lines.append(f"| {t['init']} | {t['out']} x {t['in']} | {t['ratio']:.2f}x | {t['planned']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from qlora.builtin_models import resolve_model_dir

    model_dir = Path(resolve_model_dir("builtin:smollm2-135m"))
    rows = []
    for init, kw in INITS:
        rows.append(measure(model_dir, init, kw))
        print(rows[-1], flush=True)
    from memory.terms import INIT_TRANSIENT

    transient = [{"init": init, "out": o, "in": i, "ratio": init_transient(init, o, i) / (4 * o * i),
                  "planned": INIT_TRANSIENT[init]}
                 for init in ("pissa", "olora", "loftq", "nonzero") for o, i in SHAPES]
    result = {"device": device_name("cpu"), "date": datetime.date.today().isoformat(),
              "versions": ", ".join(f"{k} {v}" for k, v in package_versions("torch", "transformers").items()),
              "rows": rows, "transient": transient}
    write_results("init-error-cpu", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
