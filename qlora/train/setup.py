"""Setting up a run: the device, the data rows, the trainable model, its optimizer groups.

Every builder here takes flat, typed arguments or one of the recipe's small
section dataclasses (:class:`DataConfig`, :class:`QuantConfig`,
:class:`LoraConfig`, :class:`OptimizerConfig`), never a whole recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from qlora.data import detect_format, load_records, pack_rows, split_eval, tokenize_dataset
from qlora.lora.diagnostics import lora_diagnostics, summarize
from qlora.lora.param_groups import lora_param_groups
from qlora.tasks import TaskExample, task_examples
from qlora.train.loss import targets_per_row
from qlora.train.recipe import DataConfig, OptimizerConfig
from quant.errors import InputError

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
