"""Setting up a run: the device, the data rows, the trainable model, its optimizer groups.

Every builder here takes flat, typed arguments or one of the recipe's small
section dataclasses (:class:`DataConfig`, :class:`QuantConfig`,
:class:`LoraConfig`, :class:`OptimizerConfig`), never a whole recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from layers.inits import INITS_FROM_WEIGHTS
from layers.tiling import tile_mlps, tile_norms
from qlora.adapters.files import install_adapter, read_adapter, save_adapter
from qlora.data import detect_format, load_records, pack_rows, split_eval, tokenize_dataset
from qlora.lora.diagnostics import lora_diagnostics, summarize
from qlora.lora.inits import InitialFactors, from_original_base, init_from_weights
from qlora.lora.param_groups import lora_param_groups
from qlora.lora.surgery import apply_lora, lora_modules
from qlora.tasks import TaskExample, task_examples
from qlora.train.loss import targets_per_row
from qlora.train.precision import torch_dtype
from qlora.train.recipe import DataConfig, LoraConfig, OptimizerConfig, QuantConfig
from quant.errors import InputError
from quant.loading import load_quantized_model

log = logging.getLogger(__name__)



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


@dataclass(frozen=True)
class RunData:
    """The packed rows a run trains and evaluates on (host tensors, see :func:`qlora.data.pack_rows`).

    Attributes:
        rows: int64 ``input_ids``/``labels``/``position_ids``, each (train rows, seq_len).
        eval_rows: the same for the held-out rows, or None without eval data.
        row_targets: target tokens of each train row, counted once here on the host, so the loop
            never reads a count back from the device.
        summary: the ``data: ...`` line the run prints.
        eval_tasks: the held-out examples as prompts with reference replies, in eval order, for the task metric
            (:mod:`qlora.tasks`); empty for text data or without eval data.
    """

    rows: dict[str, torch.Tensor]
    eval_rows: dict[str, torch.Tensor] | None
    row_targets: list[int]
    summary: str
    eval_tasks: list[TaskExample] = dataclasses.field(default_factory=list)


def row_targets(rows: dict[str, torch.Tensor]) -> list[int]:
    """Target tokens per row, as host ints (:func:`qlora.train.loss.targets_per_row`)."""
    return targets_per_row(rows["labels"]).tolist()


def load_data(data: DataConfig, tokenizer: Any, seq_len: int, seed: int) -> RunData:
    """Read, tokenize, split (``data.eval_fraction`` unless ``data.eval_path``) and pack a recipe's data.

    Raises:
        InputError: a missing or unreadable file, an unknown format or field, or no usable example
            (see :func:`qlora.data.load_records` and :func:`qlora.data.tokenize_dataset`).
    """
    ds, source = load_records(data.path)
    fields = dict(
        train_on=data.train_on, text_field=data.text_field, instruction_field=data.instruction_field,
        input_field=data.input_field, output_field=data.output_field, messages_field=data.messages_field,
    )
    examples, stats = tokenize_dataset(ds, source, tokenizer, data.format, seq_len, **fields)
    eds = ds
    if data.eval_path:
        eds, esrc = load_records(data.eval_path)
        train_ex, eval_ex = examples, tokenize_dataset(eds, esrc, tokenizer, data.format, seq_len, **fields)[0]
    else:
        train_ex, eval_ex = split_eval(examples, data.eval_fraction, seed)
    fmt = detect_format(eds.column_names, data.format, data.text_field, data.instruction_field, data.messages_field,
                        data.eval_path or source)
    tasks = [] if fmt == "text" else task_examples(
        [eds[ex.row] for ex in eval_ex], fmt, instruction_field=data.instruction_field, input_field=data.input_field,
        output_field=data.output_field, messages_field=data.messages_field,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = pack_rows(train_ex, seq_len, pad, data.packing)
    eval_rows = pack_rows(eval_ex, seq_len, pad, data.packing) if eval_ex else None
    summary = (
        f"data: {stats.examples} examples from {source} ({stats.truncated} truncated to {seq_len} tokens, "
        f"{stats.dropped} dropped with no targets left); {rows['input_ids'].shape[0]} train rows, "
        f"{0 if eval_rows is None else eval_rows['input_ids'].shape[0]} eval rows"
    )
    return RunData(rows, eval_rows, row_targets(rows), summary, tasks)


class BuiltModel(NamedTuple):
    """What :func:`build_model` returns."""

    model: nn.Module
    save: Callable[[Path], Path]
    initial: InitialFactors | None


def build_model(
    model_dir: Path,
    device: torch.device,
    quant: QuantConfig,
    lora: LoraConfig,
    model_dtype: str = "auto",
    gradient_checkpointing: bool = True,
    offload_activations: bool = False,
    resume_adapter: Path | None = None,
    attn_implementation: str | None = None,
    tiled_mlp: bool = False,
    tiled_norms: bool = False,
    tile_tokens: int = 4096,
) -> BuiltModel:
    """NF4 base (streamed) + LoRA + gradient checkpointing, ready to train.

    Args:
        model_dir: the local Hugging Face folder (16-bit or bnb-4bit) to load.
        quant: how the base is quantized (``quant_type``, ``blocksize``, ``double_quant``, ``compute_dtype``).
        lora: the adapter to add; ``lora.rank`` must be resolved (an int, as :func:`qlora.train.plan.plan_run`
            returns it), not ``auto``.
        model_dtype: dtype name of the non-quantized parameters (embeddings, norms, head); ``auto`` and the
            sections' ``auto`` dtypes mean :func:`qlora.train.precision.auto_dtype` on ``device``.
        gradient_checkpointing, offload_activations: see :func:`enable_checkpointing`.
        resume_adapter: read the adapter weights from this PEFT folder instead of initializing them.
        attn_implementation: transformers' attention (recipe ``model.attn_implementation``); None: its default.
        tiled_mlp, tiled_norms: run every decoder layer's MLP, every norm in tiles of ``tile_tokens``
            tokens (:mod:`layers.tiling`).

    Returns:
        A :class:`BuiltModel` ``(model, save, initial)``: ``save(folder)`` writes the PEFT adapter into
        ``folder`` (new or existing, file by file, weights before config: :func:`qlora.adapters.files.save_adapter`;
        for the original base after a PiSSA/OLoRA/LoftQ init) and returns the folder; ``initial`` the
        init's step-0 factors (None for kaiming/gaussian).

    Raises:
        InputError: an unresolved rank, a model folder the loader cannot read, targets that match
            nothing, or a resume adapter that does not fit the model.
    """
    if not isinstance(lora.rank, int):
        raise InputError(f"build_model needs a resolved LoRA rank, got {lora.rank!r}; plan the run first (qlora plan).")
    dtype, adapter_dtype = torch_dtype(model_dtype, device), torch_dtype(lora.dtype, device)
    log.info("non-quantized parameters (embeddings, norms, head) stay %s: recipe model.dtype", dtype)
    model = load_quantized_model(
        model_dir, device, quant.quant_type, quant.blocksize, quant.double_quant,
        torch_dtype(quant.compute_dtype, device),
        dtype=dtype, attn_implementation=attn_implementation,
    )
    if attn_implementation is not None:
        log.info("attention %s: recipe model.attn_implementation (the planner models the same)", attn_implementation)
    model.config.use_cache = False  # no KV cache in training: keeps packed-sequence masking on (see qlora.data)
    from_weights = lora.init in INITS_FROM_WEIGHTS
    apply_lora(
        model, lora.targets, lora.rank, lora.alpha, lora.dropout, lora.use_rslora, lora.variant == "dora",
        "kaiming" if from_weights else lora.init, adapter_dtype, lora.rank_pattern or None,
        lora.alpha_pattern or None, lora.freeze_A,
    )
    initial = None
    if from_weights:  # the same factors and base on a resume: the SVD/QR of the same weights
        initial = init_from_weights(model, lora.init, None if quant.quant_type == "none" else model_dir,
                                    loftq_iters=lora.loftq_iters, pissa_niter=lora.pissa_niter)
    if resume_adapter is not None:
        adapter = read_adapter(resume_adapter)
        if initial is not None:  # checkpoints hold the adapter for the original base: take the trained half
            adapter.modules = from_original_base(adapter.modules, initial)
        install_adapter(model, adapter, dtype=adapter_dtype, trainable=True)
        if lora.freeze_A:  # install made fresh trainable factors: LoRA-FA freezes A again
            for _, m in lora_modules(model):
                m.freeze_A()
    if gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and with kwargs
        enable_checkpointing(model, offload_activations)
        log.info("gradient checkpointing on (non-reentrant), one checkpoint per decoder layer; activation offload %s "
                 "(recipe offload_activations)", "on" if offload_activations else "off")
    if tiled_mlp:
        tile_mlps(model, tile_tokens)
        log.info("MLPs run in tiles of %d tokens (tiled_mlp): their intermediates exist one tile at a time, for "
                 "one more MLP forward per step", tile_tokens)
    if tiled_norms:
        tile_norms(model, tile_tokens)
        log.info("norms run in tiles of %d tokens (tiled_norms): backward keeps their inputs, not transformers' "
                 "float32 copies (4 bytes x hidden x 2 per token per norm), for one more norm forward per step",
                 tile_tokens)
    base = str(Path(model_dir).resolve())  # the folder actually trained on, so other tools can find the base

    def save(folder: Path) -> Path:
        return save_adapter(model, folder, base_model_name_or_path=base, initial=initial)

    return BuiltModel(model, save, initial)


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
