"""The planner at the trainer's front door: a recipe's settings -> :func:`memory.plan`, before any weight is read.

A recipe's memory-relevant keys become a :class:`memory.Settings` in one
place, :func:`settings_from_recipe`, and go back into a recipe in one place,
:func:`settings_to_recipe`. :func:`plan_recipe` is the one way a recipe is
planned: ``qlora train`` (:func:`plan_run`) and ``qlora plan --model
RECIPE.yaml`` both call it, and both print :func:`plan_summary`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import memory
from qlora.builtin_models import model_source, resolve_model_dir
from qlora.train.loss import CHUNK_TOKENS
from qlora.train.precision import autocast_dtype_for, dtype_name
from qlora.train.recipe import Recipe
from quant.errors import InputError, choices

log = logging.getLogger(__name__)

# recipe model.attn_implementation -> the planner's attention (flash attention keeps what sdpa's flash kernel keeps)
_ATTN = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "sdpa"}
_RECIPE_ADAPTER_DTYPES = ("bfloat16", "float32")


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
    tiled_mlp: bool = False  # the plan's tiled_mlp, resolved
    tiled_norms: bool = False  # the plan's tiled_norms, resolved
    tile_tokens: int = 4096  # tokens per tile of either
    strategy: str = "single"  # on N ranks: ddp or fsdp, resolved (grad_accum is then per rank)
    offload_params: bool = False  # fsdp's shards in pinned host memory, resolved


# ---------------------------------------------------------------------------- recipe <-> settings


def settings_from_recipe(recipe: Recipe, device: str | torch.device | None = None) -> memory.Settings:
    """The :class:`memory.Settings` of ``recipe``: the one place a recipe's keys become planner settings.

    Args:
        recipe: a validated recipe.
        device: the device the run uses (``cuda``/``cpu``); default the
            recipe's ``device``, with ``auto`` counted as ``cuda``.

    Returns:
        Settings with the recipe's seq_len, micro-batch, effective batch,
        LoRA targets/rank/dropout/variant/dtype, optimizer, checkpointing,
        offloading, packing, loss (``chunked_loss`` with the trainer's chunk size),
        attention and base format (4-bit, or quant_type none: a 16-bit base); the planner's default margin.

    Raises:
        InputError: a value the planner refuses (bad device name).
    """
    lora = recipe.lora
    if device is None:
        device = "cuda" if recipe.device == "auto" else recipe.device
    return memory.Settings(
        seq_len=recipe.seq_len,
        micro_batch_size=recipe.micro_batch_size,
        rank=lora.rank,
        effective_batch_size=recipe.effective_batch_size,
        targets=lora.targets,
        dropout=lora.dropout,
        dora=lora.variant == "dora",
        vera=lora.variant == "vera",  # delta: exactly LoRA's tensors (layers.delta), planned as LoRA
        adalora=lora.variant == "adalora",
        init=lora.init,
        adapter_dtype=dtype_name(lora.dtype, device),
        optimizer=recipe.optimizer.name,
        gradient_checkpointing=recipe.gradient_checkpointing,
        attn=_ATTN[recipe.model.attn_implementation],
        loss="chunked" if recipe.chunked_loss else "hf",
        loss_chunk_tokens=CHUNK_TOKENS,
        offload_activations=recipe.offload_activations,
        packed=recipe.data.packing,  # packed rows: sdpa gets transformers' s x s block mask
        tiled_mlp=recipe.tiled_mlp,
        tiled_norms=recipe.tiled_norms,
        tile_tokens=recipe.tile_tokens,
        strategy=recipe.distributed.strategy,
        offload_params=recipe.distributed.offload_params,
        gpus=recipe.distributed.gpus or 1,
        quant_type=recipe.quant.quant_type,
        blocksize=recipe.quant.blocksize,
        double_quant=recipe.quant.double_quant,
        device=torch.device(device).type,
    )


def settings_to_recipe(settings: memory.Settings, base: dict | None = None) -> dict:
    """The inverse of :func:`settings_from_recipe`: ``base`` (a recipe mapping) with ``settings`` written in.

    ``settings_from_recipe(recipe_from_dict(settings_to_recipe(s)))`` gives
    ``s`` back (up to ``margin`` and the CUDA overheads, which are planning
    assumptions, not recipe keys: the trainer plans with the defaults).

    Args:
        settings: resolved settings, e.g. :attr:`memory.Plan.settings`
            (``attn`` must be ``sdpa`` or ``eager``: a recipe has no ``auto``).
        base: the recipe mapping to update (not modified); default empty.

    Returns:
        A nested mapping for :func:`qlora.train.recipe.recipe_from_dict`.

    Raises:
        InputError: a setting a recipe cannot express (``attn`` auto, float16
            adapters, a loss chunk size other than the trainer's).
    """
    s = settings
    if s.attn == "auto":
        raise InputError("attn 'auto' has no recipe value; pass the plan's resolved settings (memory.Plan.settings).")
    if s.adapter_dtype not in _RECIPE_ADAPTER_DTYPES:
        raise InputError(
            f"Adapter dtype {s.adapter_dtype!r} cannot go into a recipe: the trainer keeps adapters in "
            f"{choices(_RECIPE_ADAPTER_DTYPES)} (recipe key lora.dtype)."
        )
    if s.loss == "chunked" and s.loss_chunk_tokens != CHUNK_TOKENS:
        raise InputError(
            f"A loss chunk of {s.loss_chunk_tokens} tokens cannot go into a recipe: the trainer's chunked loss uses "
            f"{CHUNK_TOKENS} tokens per chunk (recipe key chunked_loss: true). Plan with --chunked-loss {CHUNK_TOKENS}."
        )
    data = copy.deepcopy(base) if base else {}
    for key in ("model", "quant", "lora", "optimizer"):
        data.setdefault(key, {})
    data["model"]["attn_implementation"] = s.attn
    data["quant"].update(quant_type=s.quant_type, blocksize=s.blocksize, double_quant=s.double_quant)
    data["lora"].update(
        targets=s.targets if isinstance(s.targets, str) else list(s.targets), rank=s.rank, dropout=s.dropout,
        variant="dora" if s.dora else "vera" if s.vera else "adalora" if s.adalora else "lora", dtype=s.adapter_dtype,
        init=s.init,
    )
    data["optimizer"]["name"] = s.optimizer
    data.setdefault("data", {})["packing"] = s.packed
    data.update(
        seq_len=s.seq_len, micro_batch_size=s.micro_batch_size, effective_batch_size=s.effective_batch_size,
        gradient_checkpointing=s.gradient_checkpointing, chunked_loss=s.loss == "chunked",
        offload_activations=s.offload_activations, tiled_mlp=s.tiled_mlp, tiled_norms=s.tiled_norms,
        tile_tokens=s.tile_tokens,
    )
    if s.gpus != 1:
        data.setdefault("distributed", {}).update(strategy=s.strategy, offload_params=s.offload_params, gpus=s.gpus)
    if s.device == "cpu":
        data["device"] = "cpu"
    elif data.get("device") == "cpu":
        data["device"] = "auto"  # auto runs on the GPU wherever there is one
    return data


# ---------------------------------------------------------------------------- planning


def planning_model(recipe: Recipe) -> str:
    """:func:`model_source` of ``recipe``'s ``model.path``.

    Raises:
        InputError: an unknown built-in name.
    """
    return model_source(recipe.model.path)


def planning_device(recipe: Recipe, gpu: str | None = None) -> torch.device:
    """The device a recipe is planned for when none is given.

    The recipe's ``device`` when it names one; for ``auto``: ``cuda`` when a
    GPU budget is named (``gpu`` or the recipe's ``gpu``: the run is for a
    GPU, even when planned on a laptop), else this machine's device, as
    ``qlora train`` would pick it.
    """
    if recipe.device != "auto":
        return torch.device(recipe.device)
    if gpu or recipe.gpu or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _budget(recipe: Recipe, device: torch.device) -> str | memory.GPU:
    """The memory the plan must fit: the recipe's ``gpu``, else the device's own size.

    On CPU the budget is the machine's RAM; the prediction is then the
    tensor peak the live-tensor tracker would measure (no CUDA context).
    A measured budget carries no note: there is no vendor's "GB" to read.

    Raises:
        InputError: a CUDA plan with no ``gpu`` named on a machine without a GPU to measure.
    """
    if recipe.gpu:
        return recipe.gpu
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                "The run is planned for a CUDA GPU but no budget is named and torch sees no GPU here to measure: "
                "give one with --gpu (e.g. --gpu 24GB or --gpu rtx4090) or the recipe key gpu."
            )
        props = torch.cuda.get_device_properties(device)
        return memory.GPU(props.name, props.total_memory, f"{props.total_memory / 2**30:.1f} GiB")
    import psutil

    total = psutil.virtual_memory().total
    return memory.GPU("this machine's RAM", total, f"{total / 2**30:.1f} GiB")


def plan_recipe(
    recipe: Recipe,
    model: str | None = None,
    device: str | torch.device | None = None,
    *,
    gpu: str | None = None,
    ram: int | str | None = None,
    **changes,
) -> memory.Plan:
    """:func:`memory.plan` for ``recipe``'s settings: the one way a recipe is planned.

    ``qlora train`` plans with it before any weight is read, and ``qlora
    plan --model RECIPE.yaml`` prints the same plan (flags given there arrive
    as ``gpu`` and ``changes``).

    Args:
        recipe: a validated recipe.
        model: what to read shapes from (a folder, config.json or catalog
            name); default :func:`planning_model`.
        device: the run's device; default :func:`planning_device`.
        gpu: the budget; default the recipe's ``gpu``, else the device's own memory.
        ram: the host memory to fit too (:func:`memory.plan`); default ``"auto"`` (this
            machine's available RAM) when planning a CUDA run for this machine's own GPU,
            else not checked (a CPU run's budget is the RAM already).
        **changes: :class:`memory.Settings` fields that override the recipe's.

    Raises:
        InputError: bad settings, an unknown model, or no budget to plan against.
    """
    if "device" in changes:
        device = changes["device"]
    if device is not None and str(device).split(":")[0] not in memory.settings.DEVICES:
        valid = choices(memory.settings.DEVICES)  # checked before torch.device, which raises a bare RuntimeError
        raise InputError(f"Unknown device {str(device)!r}; valid choices are {valid}.")
    device = planning_device(recipe, gpu) if device is None else torch.device(device)
    settings = settings_from_recipe(recipe, device).changed(**changes)
    if ram is None and device.type == "cuda" and not (gpu or recipe.gpu):
        ram = "auto"  # planning for this machine: its GPU and its RAM
    return memory.plan(
        gpu or _budget(recipe, device), planning_model(recipe) if model is None else model, settings, ram=ram
    )


def model_label(recipe: Recipe) -> str:
    """How the plan summary names the recipe's model (``tiny-llama``, ``Meta-Llama-3.1-8B``)."""
    path = recipe.model.path
    return path.removeprefix("builtin:") if path.startswith("builtin:") else Path(path).expanduser().name


def plan_summary(p: memory.Plan, model: str) -> str:
    """The plan as ``qlora train`` logs it (and ``qlora plan --model RECIPE.yaml`` prints it), one string.

    Args:
        p: the plan. model: how to name the model (:func:`model_label`).
    """
    fp = p.footprint
    gib = 2**30
    lines = [
        f"plan: {model} on {fp.device} with a {p.gpu.total_bytes / gib:.2f} GiB budget ({p.gpu.name}), "
        f"{p.margin:.0%} kept free",
        f"  seq_len {p.seq_len}, micro_batch_size {p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation "
        + (f"x {fp.gpus} {'GPUs' if fp.device == 'cuda' else 'processes'} ({fp.strategy}) " if fp.gpus > 1 else "")
        + f"= {p.effective_batch_size} sequences/step, LoRA rank {p.rank} on {len(fp.targets)} module types",
        f"  predicted peak {fp.tensor_peak_bytes / gib:.3f} GiB of tensors in phase '{fp.peak_phase}'"
        + (f", {p.peak_bytes / gib:.2f} GiB with CUDA context and allocator reserve" if fp.device == "cuda" else ""),
    ]
    for k, v in sorted(fp.breakdown.items(), key=lambda kv: -kv[1])[:6]:
        if v:
            lines.append(f"    {k:<28} {v / 2**20:10.1f} MiB")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def plan_run(recipe: Recipe, device: torch.device, gpus: int = 1) -> RunPlan:
    """Resolve ``auto`` values with :func:`plan_recipe` before any weight is read.

    ``gpus``: the ranks the run is split over (``torchrun``'s world size): the plan is one rank's, with
    ``grad_accum`` micro-batches per rank and the recipe's ``distributed.strategy`` resolved.

    Raises:
        InputError: the planner predicts that the run does not fit (the
            message lists its suggestions), or bad settings.
    """
    from transformers import AutoTokenizer

    planned = recipe.distributed.gpus
    if planned is not None and planned != gpus:
        raise InputError(
            f"The recipe is planned for {planned} processes (distributed.gpus: {planned}) but this run has {gpus}. "
            f"Launch it with torchrun --nproc-per-node {planned} (times the nodes), or set distributed.gpus to "
            f"{gpus} (or null) and let the planner check that it fits."
        )
    model_dir = resolve_model_dir(recipe.model.path)
    # the run is on this machine, whatever GPU budget it names: its RAM must hold the host side (pinned offload
    # buffers, paged optimizer state, the process); on a CPU the RAM is the budget already
    p = plan_recipe(recipe, device=device, ram="auto" if device.type == "cuda" else None, gpus=gpus)
    fp = p.footprint
    gib = 2**30
    if not p.fits:
        sugg = "; ".join(
            f"{s.change} (predicted {s.footprint.device_total_bytes / gib:.2f} GiB)" for s in p.suggestions[:5]
        )
        if p.host_fits is False:
            usable = int(p.host_budget_bytes * (1 - p.margin))
            raise InputError(
                f"This run does not fit this machine's RAM: the host side needs {fp.host.total_bytes / gib:.2f} GiB "
                f"({fp.host.describe()}) but only {usable / gib:.2f} GiB of the available RAM is usable. Changes "
                f"that would fit: {sugg or 'none found'}."
            )
        raise InputError(
            f"This run does not fit: the planner predicts {p.peak_bytes / gib:.2f} GiB but only "
            f"{p.usable_bytes / gib:.2f} GiB of {p.gpu.name} is usable. Changes that would fit: {sugg or 'none found'}."
        )
    return RunPlan(
        model_dir=model_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir), seq_len=p.seq_len,
        micro_batch_size=p.micro_batch_size, grad_accum=p.gradient_accumulation_steps, rank=p.rank,
        predicted_peak_bytes=fp.tensor_peak_bytes, budget_bytes=p.gpu.total_bytes,
        autocast_dtype=autocast_dtype_for(device, recipe.quant.compute_dtype),
        summary=plan_summary(p, model_label(recipe)) + _float32_note(recipe),
        tiled_mlp=p.settings.tiled_mlp is True, tiled_norms=p.settings.tiled_norms is True,
        tile_tokens=p.settings.tile_tokens, strategy=fp.strategy, offload_params=fp.offload_params,
    )


def _float32_note(recipe: Recipe) -> str:
    """The planner's activation terms are measured in bf16: say so when this run computes in float32."""
    if "float32" not in (recipe.model.dtype, recipe.quant.compute_dtype):
        return ""
    return ("\n  note: float32 compute (model.dtype / quant.compute_dtype): the planner models bf16 activations "
            "and weights, so this run holds up to twice the predicted activation memory")
