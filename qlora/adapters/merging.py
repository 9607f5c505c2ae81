"""Merging adapters into base weights: in memory (and back), and to a plain checkpoint.

All merge arithmetic runs in float32 and is rounded once to the output dtype:
``W' = W0 + s·B·A`` (DoRA: ``W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖`` per row).

In memory, :func:`merge` has each adapted layer swap its base for a dense
16-bit ``nn.Linear`` holding ``W'`` and keep the original base aside
(:meth:`layers.base.AdapterLinear.merge`), so :func:`unmerge` restores it bit
for bit (for an NF4 base that is the untouched 4-bit layer; re-quantizing
``W'`` instead would add a second rounding). The cost while merged is one
dense 16-bit weight per adapted layer (``out*in*2`` bytes) on top of the kept
base. ``keep_base=False`` merges an ``nn.Linear`` base in place with no extra
memory, and cannot be undone.

:func:`merge_checkpoint` (``qlora merge``) writes a plain 16-bit Hugging Face
checkpoint, merging either into the original 16-bit weights of the base
checkpoint (``into='original'``) or into the NF4 weights the adapter was
trained against, dequantized (``into='dequantized'``). ``into='auto'`` (the
default) follows the base the adapter records it was trained on
(:mod:`qlora.adapters.record`; the rule is :func:`auto_into`).
docs/merging.md has the measured logit error of both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layers.base import AdapterLinear, base_dtype, base_weight, dense_linear
from qlora.adapters.files import Adapter, install_adapter, read_adapter
from qlora.adapters.record import BaseRecord
from qlora.lora.surgery import lora_modules, replace_module
from quant import QUANT_TYPES
from quant.errors import InputError, choices
from quant.files import atomic_dir
from quant.linear import NF4Linear

log = logging.getLogger(__name__)

INTO = ("auto", "dequantized", "original")
# Where into='auto' merges an adapter trained on a 4-bit base. docs/merging.md measured the dequantized base
# 34x closer to the trained model than the original one on a random-weight model; a real model's measurement
# decides it for good, and flipping it is this one line.
AUTO_INTO_4BIT = "dequantized"
_DEFAULT_FORMAT = ("nf4", 64, True)  # what qlora trains with, for a dequantized merge with nothing recorded
_FORMAT_FLAGS = ("quant_type (--quant-type)", "blocksize (--blocksize)", "double_quant (--no-double-quant)")
_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")


def merged_weight(module: AdapterLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W0 + s·B·A`` (or DoRA's merged weight) ``(out, in)``: float32 math, rounded once to ``dtype``.

    ``dtype`` defaults to the base's 16-bit dtype. See
    :meth:`layers.base.AdapterLinear.merged_weight` (costs one float32 ``out*in`` temporary).

    Raises:
        InputError: a pass-through module (no adapter).
    """
    return module.merged_weight(dtype)


def merge(model: nn.Module, keep_base: bool = True) -> int:
    """Fold every active adapter into its layer for fast inference; returns how many were merged.

    While merged, an adapter layer runs only its (dense) base; training the
    adapter has no effect until :func:`unmerge`. Original bases are kept as
    plain attributes (not submodules), so they are not in ``state_dict`` and
    ``model.to()`` does not move them; :func:`unmerge` moves them back to the
    merged layer's device.

    Args:
        keep_base: keep the original base for an exact :func:`unmerge`
            (costs one dense 16-bit weight per adapted layer while merged).
            False: an ``nn.Linear`` base is overwritten in place (no extra
            memory, not reversible); an NF4 base is dropped for the dense one.
    """
    n = 0
    for _, m in lora_modules(model):
        if m.active:
            m.merge(keep_base)
            n += 1
    log.info("merged %d adapters in memory (keep_base=%s)", n, keep_base)
    return n


def unmerge(model: nn.Module) -> int:
    """Restore the original bases kept by :func:`merge`; returns how many were restored.

    Raises:
        InputError: a module was merged with ``keep_base=False``.
    """
    merged = [(name, m) for name, m in lora_modules(model) if m.merged]
    lost = next((name for name, m in merged if not m.can_unmerge), None)
    if lost is not None:  # checked first, so a failure leaves every module as it was
        raise InputError(f"Module {lost!r} was merged with keep_base=False; its original weights are gone.")
    for _, m in merged:
        m.unmerge()
    n = len(merged)
    log.info("unmerged %d adapters", n)
    return n


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn ``model`` into a plain 16-bit model in place: no adapter layers, no ``NF4Linear``.

    Adapted layers become ``nn.Linear`` with the merged weight; other NF4
    layers are dequantized (float32 math, rounded once). ``dtype`` defaults to
    each layer's 16-bit dtype; when given, every other parameter is cast too.
    Returns ``model``.
    """
    merged = dequantized = 0
    for name, m in list(lora_modules(model)):
        if m.merged:
            w = m.base_layer.weight.detach().to(dtype or m.base_layer.weight.dtype)
        elif m.has_adapter and m.enabled:
            w = m.merged_weight(dtype)
            merged += 1
        else:
            w = base_weight(m.base_layer, dtype or base_dtype(m.base_layer))
        replace_module(model, name, dense_linear(m.base_layer, w))
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        replace_module(model, name, dense_linear(m, m.dequantize(dtype or m.weight_dtype)))
        dequantized += 1
    if dtype is not None:
        model.to(dtype)
    log.info(
        "merged %d adapted layers, dequantized %d other 4-bit layers (dtype %s)", merged, dequantized,
        dtype or "per layer",
    )
    return model


@dataclass(frozen=True)
class MergeTarget:
    """Which base weights a merge goes into, and why (:func:`merge_target`).

    Attributes:
        into: ``dequantized`` or ``original``.
        quant_type, blocksize, double_quant: the 4-bit format a 16-bit checkpoint is
            quantized with for ``dequantized`` (a 4-bit checkpoint is used as stored).
        reason: why, in words, for the user.
    """

    into: str
    quant_type: str
    blocksize: int
    double_quant: bool
    reason: str

    def describe(self) -> str:
        """``merging into the dequantized nf4 base: <reason>``."""
        what = f"dequantized {self.quant_type} base" if self.into == "dequantized" else "original 16-bit base"
        return f"merging into the {what}: {self.reason}"


def auto_into(record: BaseRecord | None, prequantized: bool, format_given: bool) -> tuple[str, str]:
    """The rule behind ``into='auto'``: ``(into, reason)``.

    A 4-bit checkpoint only has its dequantized weights. Otherwise the
    adapter's record decides: trained on a 4-bit base -> :data:`AUTO_INTO_4BIT`,
    on a 16-bit base -> ``original``. Without a record (a PEFT adapter, or
    one saved by an older qlora), 4-bit format arguments say it was a 4-bit
    base (``dequantized``); with none, ``original``.
    """
    if prequantized:
        return "dequantized", "the base checkpoint is 4-bit, so it has no original 16-bit weights"
    if record is not None:
        into = AUTO_INTO_4BIT if record.quantized else "original"
        on = "it" if (into == "dequantized") == record.quantized else record.describe()
        return into, f"the adapter was trained on {on} (adapter metadata)"
    if format_given:
        return "dequantized", "the adapter records no base, and a 4-bit format was given"
    return "original", "the adapter records no base it was trained on (a PEFT adapter, or saved by an older qlora)"


def merge_target(
    base_dir: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    into: str = "auto",
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
) -> MergeTarget:
    """Resolve what :func:`merge_checkpoint` merges into, from the arguments and the adapter's record.

    ``None`` format arguments mean "not given": the adapter's record fills
    them in, else qlora's training default (nf4, 64, double quant).

    Raises:
        InputError: an unknown ``into``; a folder without config.json; a given
            format argument that contradicts the adapter's record, or a 4-bit
            checkpoint in another format than the recorded one (both named).
    """
    if into not in INTO:
        raise InputError(f"Unknown merge target --into {into!r}; valid choices are {choices(INTO)}.")
    if quant_type is not None and quant_type not in QUANT_TYPES:
        raise InputError(
            f"Unknown 4-bit format --quant-type {quant_type!r}; valid choices are {choices(QUANT_TYPES)} "
            "(an adapter trained on a 16-bit base merges with --into original)."
        )
    record = (adapter if isinstance(adapter, Adapter) else read_adapter(adapter)).base
    config = _read_base_config(Path(base_dir))
    qc = config.get("quantization_config")
    given = (quant_type, blocksize, double_quant)
    if into == "auto":
        resolved, reason = auto_into(record, qc is not None, any(v is not None for v in given))
    else:
        resolved, reason = into, f"as asked (--into {into})"
        if record is not None and record.quantized != (into == "dequantized"):
            reason += f"; the adapter was trained on {record.describe()}"
    recorded = (record.quant_type, record.blocksize, record.double_quant) if record and record.quantized else None
    # a 4-bit checkpoint is used as stored: its config names its type and double quant (the blocksize is per weight)
    stored = None if qc is None else (qc.get("bnb_4bit_quant_type"), qc.get("bnb_4bit_use_double_quant"))
    if resolved == "dequantized" and recorded is not None:
        if stored is not None and any(v is not None and v != r for v, r in zip(stored, recorded[::2])):
            raise InputError(
                f"The 4-bit base {str(base_dir)!r} is {stored[0]} with double_quant {stored[1]}, but the adapter's "
                f"metadata says it was trained on {record.describe()}; merge into the 16-bit checkpoint instead, "
                "which is quantized as recorded."
            )
        for flag, value, want in zip(_FORMAT_FLAGS, given, recorded):
            if value is not None and value != want:
                raise InputError(
                    f"{flag} {value!r} contradicts the adapter's metadata: it was trained on {record.describe()}; "
                    "leave the argument out to use the recorded format."
                )
    if into == "auto" and record is not None and not record.quantized and any(v is not None for v in given):
        raise InputError(
            f"A 4-bit format was given ({', '.join(f for f, v in zip(_FORMAT_FLAGS, given) if v is not None)}) but "
            "the adapter was trained on a 16-bit base (adapter metadata), so it merges into the original weights; "
            "pass --into dequantized to merge into a 4-bit version of the base anyway."
        )
    fmt = [v if v is not None else r for v, r in zip(given, recorded or _DEFAULT_FORMAT)]
    if stored is not None:  # describe what is merged into: the file's format
        fmt[0], fmt[2] = (f if v is None else v for v, f in zip(stored, fmt[::2]))
    return MergeTarget(resolved, fmt[0], fmt[1], bool(fmt[2]), reason)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_checkpoint` wrote (``target``: what it merged into, and why)."""

    out_dir: Path
    into: str
    dtype: torch.dtype
    merged_modules: int
    tokenizer_files: tuple[str, ...]
    target: MergeTarget | None = None


def _read_base_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{str(base_dir)!r} is not a Hugging Face model folder (no config.json).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}).") from None


def _out_dtype(dtype: torch.dtype | str | None, config: dict) -> torch.dtype:
    from quant.dtypes import parse_dtype

    if dtype is not None:
        return parse_dtype(dtype)
    saved = config.get("dtype") or config.get("torch_dtype")
    if saved in ("bfloat16", "float16"):
        log.info("merged checkpoint dtype %s: the base checkpoint's", saved)
        return parse_dtype(saved)
    log.info("merged checkpoint dtype bfloat16: the base checkpoint records %r, not a 16-bit dtype", saved)
    return torch.bfloat16


def merge_checkpoint(
    base_dir: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    out_dir: str | os.PathLike,
    into: str = "auto",
    dtype: torch.dtype | str | None = None,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    skip: Sequence[str] = (),
    device: str = "cpu",
) -> MergeResult:
    """Merge a PEFT adapter into a base checkpoint and write a plain Hugging Face checkpoint.

    Args:
        base_dir: local checkpoint (16-bit, or bitsandbytes 4-bit for ``into='dequantized'``).
        adapter: PEFT adapter folder (qlora's or PEFT's), or an :class:`Adapter`
            (e.g. from :func:`qlora.adapters.multi.combine_adapters`).
        out_dir: new folder (must not exist, or be empty); written under a temporary name and renamed.
        into: ``'dequantized'``: W' = dequant(quant(W0)) + ΔW, the weights the
            QLoRA adapter was trained against (quantized with ``quant_type``,
            ``blocksize``, ``double_quant`` exactly as training does; a 4-bit
            checkpoint is used as stored). ``'original'``: W' = W0 + ΔW with the
            checkpoint's 16-bit W0. ``'auto'``: the one the adapter records it
            was trained on (:func:`auto_into`; the result's ``target`` says which and why).
        quant_type, blocksize, double_quant, skip: the 4-bit format training
            used (``'dequantized'`` only); None: the adapter's record, else nf4,
            64, double quant. ``skip`` adds layers that training kept 16-bit
            besides the output head.
        dtype: output dtype; default the base checkpoint's 16-bit dtype, else bfloat16.
        device: where the merge math runs.

    Returns:
        :class:`MergeResult`.

    Raises:
        InputError: bad arguments, folders, adapter, ``'original'`` on a 4-bit
            checkpoint, or format arguments that contradict the adapter's record (see :func:`merge_target`).
    """
    from transformers import AutoModelForCausalLM

    if into not in INTO:
        raise InputError(f"Unknown merge target --into {into!r}; valid choices are {choices(INTO)}.")
    base, out = Path(base_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"Output folder {str(out)!r} already exists and is not empty; choose a new folder.")
    config = _read_base_config(base)
    out_dtype = _out_dtype(dtype, config)
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)  # validate before loading any weights
    target = merge_target(base, adapter, into, quant_type, blocksize, double_quant)
    log.info("%s", target.describe())
    into = target.into
    prequantized = "quantization_config" in config
    if into == "original":
        if prequantized:
            raise InputError(
                f"{str(base)!r} is a 4-bit checkpoint, so it has no original 16-bit weights; use --into dequantized, "
                "or pass the 16-bit checkpoint the 4-bit one was made from."
            )
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=out_dtype, device_map=device)
    else:
        from quant.loading import load_quantized_model
        from quant.model import DEFAULT_SKIP

        model = load_quantized_model(
            base, device, target.quant_type, target.blocksize, target.double_quant, compute_dtype=out_dtype,
            skip=tuple(DEFAULT_SKIP) + tuple(skip), dtype=out_dtype,
        )
    if adapter.base_model_name_or_path and Path(adapter.base_model_name_or_path).name != base.name:
        log.info("adapter was trained on %r; merging into %s", adapter.base_model_name_or_path, base)
    install_adapter(model, adapter, dtype=None, trainable=False)
    n = sum(1 for _, m in lora_modules(model) if m.has_adapter)
    merge_and_unload(model, out_dtype)
    model.config.dtype = out_dtype
    for attr in ("quantization_config",):  # a 4-bit base's config would make transformers expect 4-bit weights
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    with atomic_dir(out, existing="refuse") as tmp:  # an empty existing folder is replaced; checked above
        model.save_pretrained(str(tmp))
        copied = _copy_tokenizer(base, tmp)
    log.info("merged %d modules into %s weights of %s -> %s (%s)", n, into, base, out, out_dtype)
    return MergeResult(out, into, out_dtype, n, tuple(copied), target)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and chat-template files, if any, so the merged folder is self-contained."""
    copied = []
    for f in sorted(src.iterdir()):
        name = f.name
        if f.is_file() and (
            name.startswith(("tokenizer", "chat_template")) or name in _TOKENIZER_FILES
            or name.endswith((".tiktoken", "spiece.model"))
        ):
            shutil.copy2(f, dst / name)
            copied.append(name)
    return copied
