"""Swap the ``nn.Linear`` layers of a causal LM for frozen 4-bit ones."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from .blockwise import check_args
from .linear import NF4Linear

log = logging.getLogger(__name__)

DEFAULT_SKIP = ("lm_head",)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in ``model``, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def skipped_names(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> set[str]:
    """Linear layers that stay 16-bit: the output embedding plus ``skip`` matches.

    A ``skip`` entry matches a module whose qualified name equals it, ends with
    ``.entry``, or matches it as a regular expression (``re.fullmatch``).
    """
    names = linear_names(model)
    out: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            out.add(name)  # the output projection is tied to / as large as the embeddings: keep 16-bit
    for pat in skip:
        rx = re.compile(pat)
        out.update(n for n in names if n == pat or n.endswith("." + pat) or rx.fullmatch(n))
    return out


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> nn.Module:
    """Replace ``nn.Linear`` modules in place with frozen :class:`NF4Linear`.

    Embeddings, norms and the output head (``lm_head`` or whatever
    ``get_output_embeddings()`` returns) keep their 16-bit dtype. Each layer's
    16-bit weight is freed as soon as it is quantized, so peak memory grows by
    about one layer, not by a second copy of the model.

    Args:
        model: any torch module, typically a transformers causal LM.
        quant_type, blocksize, double_quant: the 4-bit format.
        compute_dtype: dtype of the matmul in forward and backward.
        skip: extra module names/suffixes/regexes to keep 16-bit.

    Returns:
        The same ``model``; all remaining parameters are untouched.

    Raises:
        InputError: unsupported quant type or blocksize.
    """
    check_args(quant_type, blocksize)
    keep = skipped_names(model, skip)
    count = 0
    for name in linear_names(model):
        if name in keep:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        q = NF4Linear.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        setattr(parent, child, q)
        del linear
        count += 1
    log.info(
        "quantized %d linear layers to %s (blocksize %d, double_quant=%s, compute %s); kept 16-bit: %s",
        count, quant_type, blocksize, double_quant, compute_dtype, sorted(keep) or "none",
    )
    _record_config(model, quant_type, blocksize, double_quant, compute_dtype, keep)
    return model


def _record_config(model, quant_type, blocksize, double_quant, compute_dtype, keep) -> None:
    """Remember the format on the model so savers can write ``quantization_config``."""
    model.qlora_quant = dict(
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        skip=sorted(keep),
    )
