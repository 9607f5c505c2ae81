"""Quantize a 16-bit checkpoint directory into a 4-bit one, tensor by tensor.

The model is never built in memory: only its meta skeleton (no data) is
used, to learn which tensors are ``nn.Linear`` weights, which linears stay
16-bit (the output embedding, tied weights, ``skip``) and that the
checkpoint matches its config. Each weight is then read, quantized on
``device`` and appended to the current output shard. Host memory peaks at
about one output shard (``max_shard_size``, default 2 GB of 4-bit data) plus
one input tensor and its float32 quantization temporaries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from .blockwise import check_args, quantize_4bit
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .errors import InputError
from .loading import Progress, empty_model, load_config, parse_device, plan_checkpoint, resolve_dtype
from .model import DEFAULT_SKIP
from .saving import (
    DEFAULT_MAX_SHARD_SIZE,
    QuantizeReport,
    ShardWriter,
    atomic_output_dir,
    bnb_config_dict,
    bnb_tensors,
    check_output_dir,
    copy_side_files,
    parse_size,
    skip_modules_entry,
    split_bytes,
    write_config,
)

log = logging.getLogger(__name__)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    skip: Iterable[str] = DEFAULT_SKIP,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Write a bitsandbytes-layout 4-bit copy of a 16-bit checkpoint directory.

    Args:
        model_dir: config.json + *.safetensors (single or sharded), 16/32-bit.
        out_dir: output directory; must be absent or empty unless ``overwrite``.
        quant_type, blocksize, double_quant: the 4-bit format.
        compute_dtype: recorded as ``bnb_4bit_compute_dtype`` for loaders.
        skip: extra ``nn.Linear`` names/suffixes/regexes kept 16-bit
            (the output embedding always is).
        dtype: dtype of the tensors that stay unquantized (and of the weights
            before quantization); None: config.json's, else bfloat16.
        device: where quantization runs ('cuda' is much faster for big models).
        max_shard_size: bytes or a size string such as '2GB'.
        overwrite: replace a non-empty ``out_dir`` (only after success).
        progress: optional callback ``(bytes_done, bytes_total, key)``.

    Returns:
        A :class:`QuantizeReport` with sizes before and after.

    Raises:
        InputError: bad arguments, not a model directory, an already
            quantized checkpoint, a checkpoint that does not match its
            config, a non-floating weight, or an existing non-empty ``out_dir``.
    """
    check_args(quant_type, blocksize)
    compute_dtype = parse_dtype(compute_dtype, what="compute dtype")
    dev = parse_device(device)
    parse_size(max_shard_size)
    ckpt = Checkpoint(model_dir)
    out = check_output_dir(out_dir, overwrite, source=ckpt.path)
    if ckpt.quantization_config is not None:
        raise InputError(
            f"{str(ckpt.path)!r} is already a bitsandbytes 4-bit checkpoint "
            f"({ckpt.quantization_config.get('bnb_4bit_quant_type')}); quantize its 16-bit original instead."
        )
    config = load_config(ckpt)
    dtype = resolve_dtype(dtype, config)
    skeleton = empty_model(config, dtype)  # meta parameters: names and shapes only
    plan = plan_checkpoint(skeleton, ckpt, skip)
    params = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
    log.info(
        "quantizing %d linear weights to %s (blocksize %d, double_quant=%s) on %s; kept %s: %s",
        len(plan.quantize), quant_type, blocksize, double_quant, dev, dtype, sorted(plan.keep) or "none",
    )
    t = dict(q_before=0, q_after=0, tables=0, params_q=0, params=0, before=0)
    total, done = ckpt.total_bytes(), 0
    casts: dict[tuple[torch.dtype, torch.dtype], int] = {}
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for key in ckpt.keys():
            x = ckpt.get(key)
            nbytes, numel = x.nbytes, x.numel()
            t["before"] += nbytes
            t["params"] += numel
            if key in params and x.dtype != dtype:
                # Parameters take `dtype` before quantization too, so the quant
                # state records it (what transformers does); buffers keep theirs.
                casts[(x.dtype, dtype)] = casts.get((x.dtype, dtype), 0) + 1
                x = x.to(dtype)
            owner = plan.module_of(key)
            if owner is not None:
                packed, state = quantize_4bit(x.to(dev), quant_type, blocksize, double_quant)
                group = bnb_tensors(owner + ".", packed, state)
                grow, tables = split_bytes(group)
                t["q_before"] += nbytes
                t["q_after"] += grow
                t["tables"] += tables
                t["params_q"] += numel
                del packed, state
            else:
                group = {key: x}
            del x
            writer.add(group)
            done += nbytes
            if progress is not None:
                progress(done, total, key)
        for (src, dst), n in casts.items():
            log.info("cast %d checkpoint tensors from %s to %s", n, src, dst)
        files = writer.finish(total_parameters=t["params"])
        qc = bnb_config_dict(quant_type, double_quant, compute_dtype, skip_modules_entry(skeleton, plan.keep))
        write_config(config, tmp, qc, dtype)
        copy_side_files(ckpt.path, tmp)
        total_after = writer.total_bytes
    report = QuantizeReport(
        out_dir=out, files=tuple(files), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
        n_quantized=len(plan.quantize), params_quantized=t["params_q"], params_total=t["params"],
        bytes_quantized_before=t["q_before"], bytes_quantized_after=t["q_after"], bytes_tables=t["tables"],
        bytes_total_before=t["before"], bytes_total_after=total_after,
    )
    log.info("wrote %s (%d file(s)): %.3f bits/param for the 4-bit linears, %.2f for the whole model",
             out, len(files), report.bits_quantized, report.bits_total)
    return report
