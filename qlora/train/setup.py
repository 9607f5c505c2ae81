"""Setting up a run: the device, the autocast dtype, the trainable model, its optimizer groups."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quant.loading import load_quantized_model
from quant.errors import InputError

from qlora.adapters.files import load_adapter, save_adapter
from qlora.lora.diagnostics import lora_diagnostics, summarize
from qlora.lora.param_groups import lora_param_groups
from qlora.train.recipe import OptimizerConfig, Recipe
from qlora.lora.surgery import apply_lora, lora_modules

if TYPE_CHECKING:
    from qlora.train.plan import RunPlan

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def param_groups(model, optimizer: OptimizerConfig, loraplus_ratio: float | None = None) -> list[dict]:
    """The optimizer groups a recipe asks for: :func:`qlora.lora.lora_param_groups` with its lr and weight decay.

    Always the same helper, with or without LoRA+, so that its rules hold for
    every recipe: ``optimizer.weight_decay`` applies to A and B (LoRA+ or
    not) and never to DoRA magnitudes.

    Raises:
        InputError: see :func:`qlora.lora.lora_param_groups`.
    """
    return lora_param_groups(model, optimizer.lr, loraplus_ratio, optimizer.weight_decay)


def diagnostics_fn(model) -> dict:
    """Mean/max adapter-to-base norm ratio and grad-norm ratio over modules, for metrics.jsonl."""
    return {f"lora/{k}": v for k, v in summarize(lora_diagnostics(model)).items()}
