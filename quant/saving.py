"""Write 4-bit models in the transformers/bitsandbytes pre-quantized layout.

``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads what this
writes as a bitsandbytes 4-bit model, and :func:`quant.load_quantized_model`
loads it back. Per 4-bit weight ``<m>.weight`` the files hold

    <m>.weight                                    uint8 ((n+1)//2, 1) packed codes
    <m>.weight.absmax                             uint8 (n_blocks,) or float32 without double quant
    <m>.weight.quant_map                          float32 (16,) the code table
    <m>.weight.nested_absmax                      float32 (ceil(n_blocks/256),)   (double quant)
    <m>.weight.nested_quant_map                   float32 (256,)                  (double quant)
    <m>.weight.quant_state.bitsandbytes__<type>   uint8 UTF-8 JSON: quant_type, blocksize, dtype,
                                                  shape (+ nested_blocksize, nested_dtype, nested_offset)

and config.json carries ``quantization_config`` as transformers'
``BitsAndBytesConfig`` serializes it. Everything is written into a
temporary sibling directory and renamed into place, so a failure never leaves
a half-written output and never damages what was there before.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .blockwise import QuantState4bit, bits_per_param
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .errors import InputError
from .files import atomic_dir
from .linear import NF4Linear, quant_state_bytes
from .model import linear_names

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"
# Files that are weights (never copied along) or that we rewrite ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REWRITTEN = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class QuantizeReport:
    """Sizes of a written 4-bit checkpoint.

    "Codes + scales" is the storage that grows with the weight: packed codes,
    absmax and nested absmax; for NF4 + double quant at blocksize 64 it is
    4.127 bits per parameter. "Tables" is the fixed per-matrix cost on top:
    the 16- and 256-entry code tables and the quant-state JSON (~1.3 KB per
    matrix, negligible for real models, visible for tiny ones).

    Attributes:
        out_dir: the written directory.
        files: the safetensors files written, in order.
        quant_type, blocksize, double_quant: the 4-bit format.
        n_quantized: number of 4-bit weight matrices.
        params_quantized / params_total: element counts (4-bit weights / every tensor).
        bytes_quantized_before: those weights in their 16-bit source dtype.
        bytes_quantized_after: their codes + scales.
        bytes_tables: per-matrix code tables and quant-state JSON.
        bytes_total_before / bytes_total_after: every tensor, before / as written.
    """

    out_dir: Path
    files: tuple[str, ...]
    quant_type: str
    blocksize: int
    double_quant: bool
    n_quantized: int
    params_quantized: int
    params_total: int
    bytes_quantized_before: int
    bytes_quantized_after: int
    bytes_tables: int
    bytes_total_before: int
    bytes_total_after: int

    @property
    def bits_quantized(self) -> float:
        """Bits per parameter of the 4-bit linears (codes + scales)."""
        return 8 * self.bytes_quantized_after / max(self.params_quantized, 1)

    @property
    def bits_total(self) -> float:
        """Bits per parameter of the whole checkpoint (every byte written / every element)."""
        return 8 * self.bytes_total_after / max(self.params_total, 1)

    @property
    def bits_format(self) -> float:
        """The format's asymptotic rate, :func:`quant.bits_per_param`."""
        return bits_per_param(self.quant_type, self.blocksize, self.double_quant)


# ---- tensors of one 4-bit weight -------------------------------------------------


def quant_state_json(state: QuantState4bit) -> dict:
    """The ``quant_state.bitsandbytes__<type>`` object, in bitsandbytes' key order."""
    d = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": str(state.dtype).removeprefix("torch."),
        "shape": [int(s) for s in state.shape],
    }
    if state.double_quant:
        d.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(state.offset))
    return d


def bnb_tensors(prefix: str, packed: torch.Tensor, state: QuantState4bit) -> dict[str, torch.Tensor]:
    """File tensors of one 4-bit weight, on the host.

    Args:
        prefix: module name plus dot, e.g. ``'model.layers.0.mlp.up_proj.'``.
        packed: uint8 ``((n+1)//2, 1)``.
        state: its quant state (any device).

    Returns:
        ``{prefix + 'weight': ..., prefix + 'weight.absmax': ..., ...}`` as listed in the module docstring.
    """
    from ._codebook import code4

    cpu = lambda t: t.detach().to("cpu").contiguous()  # noqa: E731
    out = {
        prefix + "weight": cpu(packed.reshape(-1, 1)),
        prefix + "weight.absmax": cpu(state.absmax),
        prefix + "weight.quant_map": code4(state.quant_type).clone(),
    }
    if state.double_quant:
        out[prefix + "weight.nested_absmax"] = cpu(state.nested_absmax)
        # A copy: the dynamic map is one cached tensor, and safetensors refuses shared storage.
        out[prefix + "weight.nested_quant_map"] = cpu(state.nested_code).clone()
    out[prefix + "weight.quant_state.bitsandbytes__" + state.quant_type] = quant_state_bytes(quant_state_json(state))
    return out


def split_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(codes + scales bytes, table bytes) of one :func:`bnb_tensors` group."""
    grow = sum(t.nbytes for k, t in tensors.items() if k.endswith(("weight", "weight.absmax", "weight.nested_absmax")))
    return grow, sum(t.nbytes for t in tensors.values()) - grow


# ---- config -------------------------------------------------------------------------


def bnb_config_dict(
    quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str] | None
) -> dict:
    """``quantization_config`` exactly as transformers writes it (built by its own class)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip_modules,
    ).to_dict()


def skip_modules_entry(model: nn.Module, kept: set[str]) -> list[str] | None:
    """``llm_int8_skip_modules`` for a model whose ``kept`` linears stay 16-bit.

    None (transformers' own default) when transformers would keep exactly
    those linears anyway (the output embedding and tied weights); otherwise
    the explicit list, because an explicit list replaces that default.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    linears = set(linear_names(model))
    default = set(get_keys_to_not_convert(model)) & linears if linears else set()
    return None if set(kept) == default else sorted(kept)


def write_config(config, out_dir: Path, quantization_config: dict, dtype: torch.dtype) -> None:
    """Write config.json with ``quantization_config`` and ``dtype`` set (the source config is not modified)."""
    cfg = copy.deepcopy(config)
    cfg.quantization_config = quantization_config
    cfg.dtype = dtype
    cfg.save_pretrained(str(out_dir))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config, license etc. (top-level non-weight files) from ``src`` to ``dst``."""
    copied = []
    for p in sorted(src.iterdir()):
        if (p.is_file() and not p.name.startswith(".") and p.name not in _REWRITTEN
                and not p.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    skipped = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    log.info(
        "copied %s from %s%s", copied or "no side files", src,
        f"; not copied (subdirectories): {skipped}" if skipped else "",
    )
    return copied


# ---- output directory and shards ---------------------------------------------------


def check_output_dir(out_dir: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Validate the output directory before any work is done.

    Raises:
        InputError: it is a file; it is non-empty and ``overwrite`` is False;
            or it is the source checkpoint directory.
    """
    out = Path(out_dir).expanduser()
    if source is not None and out.exists() and out.resolve() == Path(source).expanduser().resolve():
        raise InputError(
            f"The output directory {str(out)!r} is the input checkpoint; write the quantized model somewhere else."
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {str(out)!r} is an existing file; pass a directory path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"The output directory {str(out)!r} already exists and is not empty; choose another path or pass "
            f"overwrite=True (--overwrite) to replace it."
        )
    return out


@contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` (:func:`quant.files.atomic_dir`).

    The previous contents of ``out_dir`` (if any, and only with ``overwrite``)
    are moved aside and deleted only after the new directory is in place; on
    any exception the temporary directory is removed and ``out_dir`` is untouched.
    """
    out = check_output_dir(out_dir, overwrite)
    with atomic_dir(out, existing="replace" if overwrite else "refuse") as tmp:
        yield tmp


class ShardWriter:
    """Collect tensors into safetensors shards of at most ``max_shard_size`` bytes.

    Host memory holds at most one shard (plus the group being added): lower
    ``max_shard_size`` to cap it. A group (the tensors of one weight) is never
    split across shards. ``finish`` names the files the way transformers does
    (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``).
    """

    def __init__(self, out_dir: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        self.out_dir = out_dir
        self.max_bytes = parse_size(max_shard_size)
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, group: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in group.values())
        if self._buf and self._buf_bytes + size > self.max_bytes:
            self._flush()
        for k, t in group.items():
            self._buf[k] = t.detach().to("cpu").contiguous()
        self._buf_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self._parts):05d}.safetensors"
        save_file(self._buf, str(self.out_dir / name), metadata={"format": "pt"})
        self._parts.append((name, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self, total_parameters: int) -> list[str]:
        """Write the last shard and the index; returns the file names."""
        if self._buf or not self._parts:
            self._flush()
        n = len(self._parts)
        if n == 1:
            os.replace(self.out_dir / self._parts[0][0], self.out_dir / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map, names = {}, []
        for i, (part, keys) in enumerate(self._parts, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        return names


def parse_size(size: int | str) -> int:
    """``'2GB'`` / ``'500MiB'`` / ``123`` -> bytes (transformers' convention).

    Raises:
        InputError: not a positive size.
    """
    from transformers.utils.hub import convert_file_size_to_int

    try:
        out = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        out = -1
    if not isinstance(out, int) or out <= 0:
        raise InputError(
            f"Invalid max shard size {size!r}; use a positive byte count or a size such as '2GB' or '500MB'."
        )
    return out


# ---- saving an in-memory model -----------------------------------------------------


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> QuantizeReport:
    """Save a model with :class:`NF4Linear` layers in the bitsandbytes pre-quantized layout.

    Works for models from :func:`quant.quantize_model` or
    :func:`quant.load_quantized_model`, on any device (tensors are copied to
    the host one shard at a time). Tied weights are written once.

    Args:
        model: a transformers causal LM with ``NF4Linear`` modules.
        out_dir: the directory to write (created; replaced only with ``overwrite``).
        max_shard_size: bytes or a size string; bigger checkpoints are sharded.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        The :class:`QuantizeReport` of what was written.

    Raises:
        InputError: the model has no 4-bit layers, mixes quant types, or
            ``out_dir`` exists and is not empty (without ``overwrite``).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not layers:
        raise InputError(f"{type(model).__name__} has no NF4Linear layers; quantize it first (quant.quantize_model).")
    formats = {(m.quant_type, m.blocksize, m.double_quant) for m in layers.values()}
    if len(formats) > 1:
        raise InputError(
            f"The model mixes 4-bit formats {sorted(formats)} (quant type, blocksize, double quant); save supports one."
        )
    (quant_type, _, double_quant), first = formats.pop(), next(iter(layers.values()))
    tied = (set(getattr(model, "all_tied_weights_keys", {}) or {})
            if getattr(model.config, "tie_word_embeddings", False) else set())
    plain = {k: v for k, v in model.state_dict().items() if k not in tied and k.rpartition(".")[0] not in layers}
    plain.update({n + ".bias": m.bias for n, m in layers.items() if m.bias is not None})
    tally = dict(q_before=0, q_after=0, tables=0, t_before=0, params_q=0, params=0)
    with atomic_output_dir(Path(out_dir).expanduser(), overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for name, layer in layers.items():
            group = bnb_tensors(name + ".", layer.weight, layer.quant_state)
            grow, tables = split_bytes(group)
            n = layer.in_features * layer.out_features
            tally["q_before"] += n * layer.weight_dtype.itemsize
            tally["q_after"] += grow
            tally["tables"] += tables
            tally["params_q"] += n
            writer.add(group)
        for key, t in plain.items():
            tally["t_before"] += t.nbytes
            tally["params"] += t.numel()
            writer.add({key: t})
        files = writer.finish(total_parameters=tally["params"] + tally["params_q"])
        qc = bnb_config_dict(
            quant_type, double_quant, first.compute_dtype, skip_modules_entry(model, set(linear_names(model)))
        )
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        write_config(model.config, tmp, qc, emb.weight.dtype if emb is not None else first.weight_dtype)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        total_after = writer.total_bytes
    report = QuantizeReport(
        out_dir=Path(out_dir).expanduser(), files=tuple(files), quant_type=quant_type, blocksize=first.blocksize,
        double_quant=double_quant, n_quantized=len(layers), params_quantized=tally["params_q"],
        params_total=tally["params_q"] + tally["params"], bytes_quantized_before=tally["q_before"],
        bytes_quantized_after=tally["q_after"], bytes_tables=tally["tables"],
        bytes_total_before=tally["q_before"] + tally["t_before"], bytes_total_after=total_after,
    )
    log.info("saved %d 4-bit matrices to %s in %d file(s): %.3f bits/param (linears), %.2f (whole model)",
             report.n_quantized, report.out_dir, len(files), report.bits_quantized, report.bits_total)
    return report
