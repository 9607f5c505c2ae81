"""PiSSA, OLoRA and LoftQ on a model: factors from the original weights, the rest as the (re-quantized) base.

:func:`init_from_weights` runs after :func:`qlora.lora.apply_lora`. For each
adapter layer it reads the layer's *original* 16-bit weight from the
checkpoint (a 4-bit base only holds ``Q(W)``, and both PiSSA's residual and
LoftQ's alternation need ``W`` itself), computes the factors
(:mod:`layers.inits`), installs them as the adapter and makes the rest the
base (:meth:`layers.AdapterLinear.rebase`: quantized again on an NF4 base).
One layer at a time: one float32 copy of one weight and its SVD workspace.

The base then differs from the checkpoint's, so an adapter saved as trained
would only work on that modified base. :class:`InitialFactors` keeps the
step-0 factors (``A0``, ``B0``) and :func:`to_original_base` rewrites a
trained adapter for the original base, as PEFT does for PiSSA: rank ``2r``
with ``A' = [A; A0]``, ``B' = [B, -B0]`` and alpha doubled (times sqrt(2) with
rsLoRA), so ``s'·B'·A' = s·(B·A - B0·A0)``: on the original ``W`` that is
the trained model up to what the base's format rounds away
(``Q(W_res) - W_res`` for PiSSA and OLoRA on 4 bits, ``W - Q - s·B0·A0``
for LoftQ; exact on a 16-bit base). :func:`from_original_base` undoes it
on resume.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from layers.inits import INITS_FROM_WEIGHTS, NONZERO_RATIO, loftq, nonzero, olora, pissa
from qlora.lora.surgery import lora_modules
from quant.errors import InputError, choices

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InitialFactors:
    """The step-0 adapter of every module an init from the weights moved (float32, on the CPU).

    Attributes:
        init: ``pissa``, ``olora`` or ``loftq``.
        factors: module name -> ``(A0 (r, in), B0 (out, r))``.
    """

    init: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _roundtrip(layer: nn.Module):
    """``W -> dequantize(quantize(W))`` in the base's own 4-bit format (LoftQ's quantizer)."""
    from quant.blockwise import dequantize_4bit, quantize_4bit

    base = layer.base_layer

    def q(w: torch.Tensor) -> torch.Tensor:
        packed, state = quantize_4bit(w.to(base.weight.device, base.weight_dtype), base.quant_type, base.blocksize,
                                      base.double_quant)
        return dequantize_4bit(packed, state, torch.float32).to(w.device)

    return q


def init_from_weights(model: nn.Module, init: str, model_dir: str | Path | None = None, *, loftq_iters: int = 1,
                      pissa_niter: int | None = None, nonzero_ratio: float = NONZERO_RATIO, seed: int = 0,
                      only: Collection[str] | None = None) -> InitialFactors:
    """Re-initialize every LoRA layer of ``model`` from its original weight (see the module docstring).

    Args:
        init: ``pissa``, ``olora`` or ``loftq``.
        model_dir: the 16-bit checkpoint the model was loaded from (the original weights are read from it,
            one at a time); None: a dense (16-bit) base's own weights.
        loftq_iters: LoftQ's alternations. pissa_niter: PiSSA by a randomized SVD with that many iterations.
        nonzero_ratio: the nonzero init's starting update RMS, as a fraction of each weight's.
        seed: the nonzero init draws each layer's factors from its own CPU generator, seeded from ``seed`` and
            the layer's name: the same factors whatever else drew before, in any order of layers (a resume,
            a rebuild of the trained model, a loader going unit by unit).
        only: just these adapter layers (a loader going unit by unit); their factors may then be none.

    Returns:
        The step-0 factors, for :func:`to_original_base`.

    Raises:
        InputError: an unknown init; DoRA layers; LoftQ on a 16-bit base (nothing to quantize); a 4-bit base
            without the 16-bit checkpoint (a bnb-4bit folder holds no original weights); a rank above a
            layer's size.
    """
    from quant.checkpoint import Checkpoint

    if init not in INITS_FROM_WEIGHTS:
        raise InputError(f"Unknown init from the weights {init!r}; valid choices are {choices(INITS_FROM_WEIGHTS)}.")
    ckpt = None
    if model_dir is not None:
        ckpt = Checkpoint(model_dir)
        if ckpt.quantization_config is not None:
            raise InputError(
                f"lora.init {init!r} needs the original 16-bit weights, but {str(model_dir)!r} is a bitsandbytes "
                f"4-bit checkpoint: it holds only Q(W). Train from the 16-bit checkpoint it was made from, or use "
                f"lora.init kaiming or gaussian."
            )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in lora_modules(model):
        if not layer.has_adapter or (only is not None and name not in only):
            continue
        if type(layer).__name__ == "DoRALinear":
            raise InputError(f"lora.init {init!r} with DoRA is not supported: the magnitude would need its own "
                             f"init from the residual. Use lora.variant lora, or lora.init kaiming/gaussian.")
        quantized = hasattr(layer.base_layer, "requantize")
        if quantized and ckpt is None:
            raise InputError(f"lora.init {init!r} on a 4-bit base needs the 16-bit checkpoint's weights; pass "
                             f"model_dir.")
        if init == "loftq" and not quantized:
            raise InputError("lora.init loftq fits the adapter to the 4-bit base's quantization error, but this base "
                             "is 16-bit (quant.quant_type none). Use pissa or olora there, or an nf4/fp4 base.")
        key = f"{name}.weight"
        if ckpt is not None and key not in ckpt:
            raise InputError(f"lora.init {init!r} reads each adapted layer's original weight, but {str(model_dir)!r} "
                             f"has no tensor {key!r}; its tensor names do not follow the model's module names.")
        w = ckpt.get(key) if ckpt is not None else layer.base_layer.weight
        dev = layer.device
        w = w.to(dev, torch.float32)
        if init == "pissa":
            a, b, base = pissa(w, layer.rank, layer.scale, pissa_niter)
        elif init == "olora":
            a, b, base = olora(w, layer.rank, layer.scale)
        elif init == "nonzero":
            gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
            a, b, base = nonzero(w, layer.rank, layer.scale, nonzero_ratio, gen)
        else:
            a, b, base = loftq(w, layer.rank, layer.scale, _roundtrip(layer), loftq_iters)
        dtype = layer.lora_A.weight.dtype
        trainable = layer.lora_A.weight.requires_grad
        layer.install(a, b, layer.alpha, use_rslora=layer.use_rslora, dropout=layer.dropout, trainable=True,
                      dtype=dtype)
        if not trainable:  # LoRA-FA: A stays as initialized
            layer.freeze_A()
        layer.rebase(base)
        # the factors as installed (rounded to the adapter dtype): what the conversion must subtract
        factors[name] = (layer.lora_A.weight.detach().to("cpu", torch.float32, copy=True),
                         layer.lora_B.weight.detach().to("cpu", torch.float32, copy=True))
        del w, a, b, base
    if not factors and only is None:
        raise InputError("The model has no LoRA layers to initialize; apply_lora first.")
    initial = InitialFactors(init, factors)
    if only is None:
        log_initial(initial, requantized=ckpt is not None)
    return initial


def log_initial(initial: InitialFactors, requantized: bool) -> None:
    """The one log line of an init from the weights, once all its layers are done."""
    log.info("lora.init %s: %d layers' adapters from their weights' %s, the rest in the base%s", initial.init,
             len(initial.factors),
             {"pissa": "top singular directions", "olora": "QR factors", "loftq": "4-bit error",
              "nonzero": "Gaussian factors (both nonzero)"}[initial.init],
             " (re-quantized)" if requantized else "")


def to_original_base(modules: dict, initial: InitialFactors) -> dict:
    """A trained adapter's modules rewritten for the original base: rank 2r, ``[A; A0]``, ``[B, -B0]``.

    Args:
        modules: module name -> :class:`qlora.adapters.files.ModuleAdapter` (not changed).

    Returns:
        New module name -> ModuleAdapter mapping.
    """
    out = {}
    for name, m in modules.items():
        a0, b0 = initial.factors[name]
        a = torch.cat([m.lora_A, a0.to(m.lora_A)], dim=0)
        b = torch.cat([m.lora_B, -b0.to(m.lora_B)], dim=1)
        # scale' = scale for rank 2r: alpha x2 (alpha/r), or x sqrt(2) (alpha/sqrt(r), rsLoRA)
        alpha = m.alpha * (2**0.5 if m.use_rslora else 2.0)
        out[name] = dataclasses.replace(m, lora_A=a, lora_B=b, alpha=alpha)
    return out


def from_original_base(modules: dict, initial: InitialFactors) -> dict:
    """The inverse of :func:`to_original_base`: the trained ``(A, B)`` back out of a rank-2r adapter.

    Raises:
        InputError: an adapter that was not written by :func:`to_original_base` for these factors.
    """
    out = {}
    for name, m in modules.items():
        a0, _ = initial.factors[name]
        r = a0.shape[0]
        if m.lora_A.shape[0] != 2 * r:
            raise InputError(f"Module {name!r}: the adapter has rank {m.lora_A.shape[0]}, but an adapter saved for "
                             f"the original base after lora.init {initial.init} has rank {2 * r}.")
        alpha = m.alpha / (2**0.5 if m.use_rslora else 2.0)
        # views: AdapterLinear.install copies them into contiguous parameters
        out[name] = dataclasses.replace(m, lora_A=m.lora_A[:r], lora_B=m.lora_B[:, :r], alpha=alpha)
    return out
