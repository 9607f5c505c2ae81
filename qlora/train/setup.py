"""Turning a recipe into a device, a plan and a trainable model (used by ``train``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quant.loading import load_quantized_model
from quant.errors import InputError

from qlora.adapters.files import load_adapter, save_adapter
from qlora.builtin_models import resolve_model_dir
from qlora.lora.diagnostics import lora_diagnostics, summarize
from qlora.lora.param_groups import loraplus_param_groups
from qlora.train.recipe import Recipe
from qlora.lora.surgery import apply_lora, lora_modules, lora_parameters

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHUNK_TOKENS = 1024  # rows per chunk of the chunked loss (qlora.train.loss); the planner is told the same


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu.

    Raises:
        InputError: ``cuda`` requested on a machine without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("The recipe asks for device 'cuda' but torch sees no CUDA GPU here; set device: cpu or auto.")
    return torch.device(name)


def autocast_dtype_for(device: torch.device, compute: str) -> torch.dtype:
    """bf16 autocast where supported; fp16 (with a loss scaler) on GPUs without bf16."""
    want = _DTYPES[compute]
    if device.type == "cuda" and want == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: using fp16 autocast with a gradient scaler instead")
        return torch.float16
    return want


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


def build_model(recipe: Recipe, plan: RunPlan, device: torch.device, resume_adapter: Path | None = None):
    """NF4 base (streamed) + LoRA + gradient checkpointing, ready to train.

    With ``resume_adapter`` the adapter weights are read from that folder
    instead of freshly initialized.

    Returns:
        (model, save_fn(folder), ...) where save_fn writes the PEFT adapter.
    """
    dtype = _DTYPES[recipe.model.dtype]
    log.info("non-quantized parameters (embeddings, norms, head) stay %s: recipe model.dtype", dtype)
    model = load_quantized_model(
        plan.model_dir, device, recipe.quant.quant_type, recipe.quant.blocksize, recipe.quant.double_quant,
        _DTYPES[recipe.quant.compute_dtype], dtype=dtype,
    )
    model.config.use_cache = False  # no KV cache in training: keeps packed-sequence masking on (see qlora.data)
    lora = recipe.lora
    apply_lora(
        model, lora.targets, plan.rank, lora.alpha, lora.dropout, lora.use_rslora, lora.variant == "dora",
        lora.init, _DTYPES[lora.dtype], lora.rank_pattern or None, lora.alpha_pattern or None, lora.freeze_A,
    )
    if resume_adapter is not None:
        load_adapter(model, resume_adapter, dtype=_DTYPES[lora.dtype], trainable=True)
        if lora.freeze_A:
            for _, m in lora_modules(model):
                m.lora_A.weight.requires_grad_(False)
    if recipe.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and with kwargs
        enable_checkpointing(model, recipe.offload_activations)
        log.info("gradient checkpointing on (non-reentrant), one checkpoint per decoder layer; activation offload %s "
                 "(recipe offload_activations)", "on" if recipe.offload_activations else "off")
    base = str(plan.model_dir.resolve())  # the folder actually trained on, so other tools can find the base

    def save(folder: Path) -> None:
        save_adapter(model, folder, base_model_name_or_path=base)

    return model, save


def enable_checkpointing(model, offload_activations: bool = False):
    """Checkpoint every decoder layer, non-reentrant (transformers >= 5 renamed the method).

    With ``offload_activations`` the checkpointed layer inputs wait in pinned
    host memory between forward and backward (see :mod:`qlora.train.offload`).

    Returns:
        The :class:`qlora.train.offload.ActivationOffloader`, or None without offload.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not offload_activations:
        return None
    from qlora.train.offload import offload_checkpointed_inputs

    return offload_checkpointed_inputs(model)


def param_groups(model, recipe: Recipe) -> list[dict]:
    """Optimizer groups: one for all adapter parameters, or LoRA+ groups (B at ratio x lr)."""
    if recipe.lora.loraplus_ratio:
        return loraplus_param_groups(model, recipe.optimizer.lr, recipe.lora.loraplus_ratio)
    return [{"params": lora_parameters(model)}]


def diagnostics_fn(model) -> dict:
    """Mean/max adapter-to-base norm ratio and grad-norm ratio over modules, for metrics.jsonl."""
    return {f"lora/{k}": v for k, v in summarize(lora_diagnostics(model)).items()}
