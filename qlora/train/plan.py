"""The planner at the trainer's front door: a recipe's settings -> :func:`memory.plan`, before any weight is read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quant.errors import InputError

from qlora.builtin_models import resolve_model_dir
from qlora.train.loss import CHUNK_TOKENS
from qlora.train.recipe import Recipe
from qlora.train.setup import autocast_dtype_for

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What the planner resolved for a run, plus the tokenizer and base-model folder."""

    model_dir: Path
    tokenizer: Any
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    rank: int
    predicted_peak_bytes: int
    budget_bytes: int
    autocast_dtype: torch.dtype
    summary: str


def _budget(recipe: Recipe, device: torch.device) -> str:
    """The memory the plan must fit: the recipe's ``gpu``, else the device's own size.

    On CPU the budget is the machine's RAM; the prediction is then the
    tensor peak the live-tensor tracker would measure (no CUDA context).
    """
    if recipe.gpu:
        return recipe.gpu
    if device.type == "cuda":
        return f"{torch.cuda.get_device_properties(device).total_memory // 2**20}MiB"
    import psutil

    return f"{psutil.virtual_memory().total // 2**20}MiB"


def plan_recipe(recipe: Recipe, model: str, device: torch.device):
    """:func:`memory.plan` for ``recipe``'s settings on ``model`` (a folder, config or catalog name).

    The one place a recipe's keys become planner arguments: ``qlora train``
    plans the recipe's own model folder with it, and the GPU recipes' headers
    are checked against it on catalog models (tests/qlora/test_train.py).

    Raises:
        InputError: bad settings or an unknown model.
    """
    import memory

    lora = recipe.lora
    attn = "sdpa" if recipe.model.attn_implementation == "flash_attention_2" else recipe.model.attn_implementation
    return memory.plan(
        _budget(recipe, device), model, recipe.seq_len, recipe.micro_batch_size, lora.rank,
        recipe.effective_batch_size, lora.targets, lora.dropout, lora.variant == "dora", lora.dtype,
        recipe.optimizer.name, recipe.gradient_checkpointing, attn,
        loss="chunked" if recipe.chunked_loss else "hf", loss_chunk_tokens=CHUNK_TOKENS,
        quant_type=recipe.quant.quant_type, blocksize=recipe.quant.blocksize,
        double_quant=recipe.quant.double_quant, device=device.type,
        offload_activations=recipe.offload_activations,
    )


def plan_run(recipe: Recipe, device: torch.device) -> RunPlan:
    """Resolve ``auto`` values with :func:`memory.plan` before any weight is read.

    Raises:
        InputError: the planner predicts that the run does not fit (the
            message lists its suggestions), or bad settings.
    """
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(recipe.model.path)
    p = plan_recipe(recipe, str(model_dir), device)
    fp = p.footprint
    gib = 2**30
    lines = [
        f"plan: {model_dir.name} on {device.type} with a {p.gpu.total_bytes / gib:.2f} GiB budget ({p.gpu.name}), "
        f"{p.margin:.0%} kept free",
        f"  seq_len {p.seq_len}, micro_batch_size {p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation "
        f"= {p.effective_batch_size} sequences/step, LoRA rank {p.rank} on {len(fp.targets)} module types",
        f"  predicted peak {fp.tensor_peak_bytes / gib:.3f} GiB of tensors in phase '{fp.peak_phase}'"
        + (f", {p.peak_bytes / gib:.2f} GiB with CUDA context and allocator reserve" if device.type == "cuda" else ""),
    ]
    for k, v in sorted(fp.breakdown.items(), key=lambda kv: -kv[1])[:6]:
        if v:
            lines.append(f"    {k:<28} {v / 2**20:10.1f} MiB")
    lines += [f"  note: {n}" for n in p.notes]
    if not p.fits:
        sugg = "; ".join(f"{s.change} (predicted {s.footprint.device_total_bytes / gib:.2f} GiB)" for s in p.suggestions[:5])
        raise InputError(
            f"This run does not fit: the planner predicts {p.peak_bytes / gib:.2f} GiB but only "
            f"{p.usable_bytes / gib:.2f} GiB of {p.gpu.name} is usable. Changes that would fit: {sugg or 'none found'}."
        )
    return RunPlan(
        model_dir=model_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir), seq_len=p.seq_len,
        micro_batch_size=p.micro_batch_size, grad_accum=p.gradient_accumulation_steps, rank=p.rank,
        predicted_peak_bytes=fp.tensor_peak_bytes, budget_bytes=p.gpu.total_bytes,
        autocast_dtype=autocast_dtype_for(device, recipe.quant.compute_dtype), summary="\n".join(lines),
    )
