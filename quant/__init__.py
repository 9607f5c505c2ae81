"""quant: 4-bit NormalFloat weights with double-quantized scales, in plain torch.

The format, in plain words
--------------------------
A weight matrix is flattened row-major and cut into blocks of 64 values.
Each block is divided by its largest absolute value (its *absmax*), so every
value lands in [-1, 1], and is then replaced by the index of the nearest of
16 fixed levels. For NF4 those levels are quantiles of a normal distribution
(weights are roughly normal, so each level is used about equally often); FP4
is a tiny sign/exponent/mantissa float. Two 4-bit indices share one byte, the
first in the high nibble.

The absmax values cost 32 bits per 64 weights (0.5 bit/param). *Double
quantization* shrinks them: subtract their mean, then quantize them again to
8 bits in blocks of 256 with a float32 scale per block. Storage becomes
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (vs 4.5 without, 16 for bf16).

Everything here is bit-identical to bitsandbytes (its CPU kernels are the
oracle in the tests), so checkpoints move freely between qlora and
transformers + bitsandbytes.

The autograd trade-off
----------------------
A frozen 4-bit layer computes ``y = x @ dequant(W)^T``. Autograd for a plain
linear would keep x (for W's gradient) and the dequantized W (for x's
gradient). W is frozen, so x is never needed; and the dense W is cheaper to
rebuild than to keep. ``NF4Linear`` therefore saves *nothing* for backward
but a reference to its packed weight, and re-dequantizes in backward: it pays
one extra dequantization per layer per step to avoid holding out*in*2 bytes
per layer (117 MB for one Llama-3-8B MLP matrix) across the pass.

Public API
----------
quantize_4bit / dequantize_4bit / QuantState4bit   blockwise 4-bit tensors
NF4Linear / nf4_linear                             the frozen layer
quantize_model                                     nn.Linear -> NF4Linear in place
load_quantized_model / UnitHook                    stream a checkpoint dir (16-bit or bnb 4-bit) into a 4-bit model,
                                                   optionally unit by unit (FSDP2 shards each unit as it loads)
save_quantized / QuantizeReport                    write the bitsandbytes pre-quantized layout, with sizes
quantize_checkpoint                                16-bit dir -> 4-bit dir, tensor by tensor (the CLI's path)
Checkpoint                                         a validated safetensors checkpoint directory
bits_per_param                                     storage arithmetic (quant.formats: no torch, used by memory/)
InputError                                         the user-facing error type
"""

import importlib as _importlib
import logging as _logging

# name -> submodule. Imported on first use, so ``quant.errors`` and ``quant.formats`` (which the planner
# needs) cost no torch import: ``qlora plan`` answers in well under a second instead of paying ~2.5 s.
_API = {
    "BLOCKSIZES": "formats", "QUANT_TYPES": "formats", "bits_per_param": "formats",
    "FP4_CODE": "_codebook", "NF4_CODE": "_codebook",
    "QuantState4bit": "blockwise", "dequantize_4bit": "blockwise", "quantize_4bit": "blockwise",
    "Checkpoint": "checkpoint",
    "InputError": "errors",
    "NF4Linear": "linear", "nf4_linear": "linear",
    "UnitHook": "loading", "load_quantized_model": "loading",
    "DEFAULT_SKIP": "model", "linear_names": "model", "quantize_model": "model",
    "QuantizeReport": "saving", "save_quantized": "saving",
    "quantize_checkpoint": "streaming",
}

# bitsandbytes' CPU backend logs a warning at import that an optional kernel-hub package is missing; qlora
# never uses that kernel, and a library (the planner in a user's script) must not print. Only that logger.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


def __getattr__(name: str):
    if name in _API:
        value = getattr(_importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))


__all__ = sorted(_API)
