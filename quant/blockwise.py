"""Blockwise 4-bit (NF4/FP4) and 8-bit quantization in pure torch.

This is the reference path: it runs on every device and is bit-identical to
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (tests compare
packed bytes, absmax, nested absmax and offset). ``dequantize_4bit`` hands
over to the bitsandbytes kernel when it is installed (``backend='auto'``),
because it is several times faster and produces the same values; the torch
path stays available as ``backend='torch'``. Quantization of the 4-bit codes
always runs here: it is what defines the format, and it is as fast on CPU.

Work is done in chunks of whole blocks, so quantizing a tensor of n elements
needs the output (n/2 bytes + scales) plus O(chunk) float32 temporaries,
instead of the ~16 bytes per element a one-shot float32 path costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ._codebook import NESTED_BLOCKSIZE, code4, dynamic_code, midpoints4
from .dtypes import FLOAT_DTYPES
from .errors import InputError
from .formats import QUANTIZE_CHUNK, bits_per_param, check_args  # noqa: F401  (bits_per_param re-exported)


@dataclass
class QuantState4bit:
    """Everything needed to dequantize one 4-bit tensor.

    Attributes:
        absmax: per-block scales, float32 ``(n_blocks,)``; or uint8 codes of
            ``absmax - offset`` when double-quantized.
        shape: the original tensor's shape.
        dtype: the original tensor's dtype (the default dequantize dtype).
        blocksize: elements per first-level block.
        quant_type: ``'nf4'`` or ``'fp4'``.
        offset: float32 scalar tensor, the mean of the absmax (double quant only).
        nested_absmax: float32 ``(ceil(n_blocks/256),)`` second-level scales.
        nested_code: float32 ``(256,)`` dynamic map for the second level.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def to(self, device: torch.device | str) -> QuantState4bit:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            absmax=mv(self.absmax),
            offset=mv(self.offset),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
        )


def _check_tensor(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"Expected a torch.Tensor to quantize, got {type(x).__name__}.")
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"Cannot quantize a tensor of dtype {x.dtype}; 4-bit quantization takes "
            f"float32, float16 or bfloat16 tensors."
        )
    if x.numel() == 0:
        raise InputError("Cannot quantize an empty tensor (0 elements).")


def _block_scales(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale one chunk of float32 values into [-1, 1] by block.

    Mirrors bitsandbytes' arithmetic exactly: full blocks multiply by the
    reciprocal of the clamped absmax, a trailing partial block divides.

    Returns:
        (scaled float32 (n,), absmax float32 (ceil(n/blocksize),))
    """
    n = x.numel()
    rem = n % blocksize
    full = n - rem
    parts, scales = [], []
    if full:
        blocks = x[:full].view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        parts.append(torch.clamp(blocks * (1.0 / am.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1))
        scales.append(am)
    if rem:
        tail = x[full:]
        am = tail.abs().amax().clamp(min=1e-38)
        parts.append(torch.clamp(tail / am, -1, 1))
        scales.append(am.view(1))
    scaled = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = scales[0] if len(scales) == 1 else torch.cat(scales)
    return scaled, absmax


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize a float tensor to packed 4-bit codes.

    Args:
        x: float32/float16/bfloat16 tensor of any shape, on any device.
        quant_type: ``'nf4'`` (default) or ``'fp4'``.
        blocksize: one of 32..4096 (powers of two); 64 by default.
        double_quant: also quantize the absmax values to 8 bits (blocksize 256).

    Returns:
        ``(packed, state)``: packed is uint8 ``((n+1)//2, 1)`` with the first
        element of each pair in the high nibble.

    Raises:
        InputError: unsupported quant type or blocksize, non-float or empty input.
    """
    check_args(quant_type, blocksize)
    _check_tensor(x)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=x.device)
    mids, order = midpoints4(quant_type, x.device)
    step = max(blocksize, (QUANTIZE_CHUNK // blocksize) * blocksize)  # whole blocks, even length
    for start in range(0, n, step):
        chunk = flat[start : start + step].float()
        scaled, am = _block_scales(chunk, blocksize)
        del chunk
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        if scaled.numel() % 2:
            # An odd element count leaves half a byte: bitsandbytes fills it
            # with the code of 0.0, so the low nibble is that code, not 0.
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        rank = torch.bucketize(scaled, mids)  # int64: index into value-sorted table
        del scaled
        q = rank.to(torch.uint8) if quant_type == "nf4" else order[rank]
        del rank
        packed[start // 2 : start // 2 + q.numel() // 2, 0] = (q[0::2] << 4) | q[1::2]
    state = QuantState4bit(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        state = _compress_absmax(state)
    return packed, state


def _compress_absmax(state: QuantState4bit) -> QuantState4bit:
    offset = state.absmax.mean()
    codes, nested_absmax = quantize_8bit(state.absmax - offset, NESTED_BLOCKSIZE)
    return replace(
        state,
        absmax=codes,
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=dynamic_code(codes.device),
    )


def quantize_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with the dynamic map.

    Bit-identical to bitsandbytes' CPU kernel (>= 0.50), which does not
    search the table per value: it scales each value into [-1, 1], maps it to
    one of 65,536 evenly spaced bins (``trunc((v+1)/2 * 65535 + 0.5)``) and
    reads the code of the bin's centre from a precomputed table. So a value
    within half a bin (~1.5e-5) of a midpoint can land on the farther code;
    matching that keeps saved files byte-identical. Blocks whose absmax is 0
    get code 0. Inputs here are small (the n_blocks first-level scales).

    Returns:
        (uint8 codes (n,), float32 absmax (ceil(n/blocksize),))
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normed = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    # Each step is a separate float32 rounding, as in the kernel.
    pos = ((normed + 1.0) * 0.5) * 65535.0 + 0.5
    codes = _bin_lut(x.device)[pos.to(torch.int32).long()]
    codes = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.view(-1)[:n].clone(), absmax  # clone: a prefix view would keep the padded storage alive


def _bin_lut(device: torch.device | str) -> torch.Tensor:
    """uint8 (65536,): nearest dynamic code of each bin centre -1 + 2i/65535."""
    global _LUT
    if _LUT is None:
        code = dynamic_code()
        mids = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
        _LUT = torch.searchsorted(mids, centres, right=False).to(torch.uint8)
    return _LUT.to(device)


_LUT: torch.Tensor | None = None


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of :func:`quantize_8bit`: ``code[c] * absmax[i // blocksize]`` in float32."""
    n = codes.numel()
    vals = code[codes.reshape(-1).long()]
    pad = (-n) % blocksize
    out = torch.nn.functional.pad(vals, (0, pad)).view(-1, blocksize) * absmax.view(-1, 1)
    return out.view(-1)[:n]


def first_level_absmax(state: QuantState4bit) -> torch.Tensor:
    """The float32 per-block scales, undoing double quantization if used."""
    if not state.double_quant:
        return state.absmax.float()
    code = state.nested_code if state.nested_code is not None else dynamic_code(state.absmax.device)
    am = dequantize_8bit(state.absmax, state.nested_absmax, code, NESTED_BLOCKSIZE)
    return am + state.offset


def import_bitsandbytes():
    """``bitsandbytes``, or None where it is not installed; the one place qlora imports it
    (:mod:`quant` quiets its import-time warning about an optional kernel package).

    On a CPU with AVX512-BF16, bitsandbytes' import asks the ``kernels`` package for a hub kernel,
    and offline (qlora's runs and tests) ``kernels`` logs that it skipped a trust check. qlora never
    runs that kernel and a library must not print, so ``kernels``' logger is raised to ERROR for the
    import only, and put back after.
    """
    hub = logging.getLogger("kernels")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        hub.setLevel(level)
    return bitsandbytes


def _bnb_dequantize(packed: torch.Tensor, state: QuantState4bit, absmax: torch.Tensor, dtype: torch.dtype):
    if import_bitsandbytes() is None:  # importing it registers torch.ops.bitsandbytes
        return None
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, absmax, state.blocksize, state.quant_type, list(state.shape), dtype
    )


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState4bit,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize packed 4-bit codes back to a dense tensor.

    Args:
        packed: uint8 ``((n+1)//2, 1)`` from :func:`quantize_4bit`.
        state: its :class:`QuantState4bit`.
        dtype: output dtype; defaults to ``state.dtype``. Values are computed
            in float32 and rounded once.
        backend: ``'torch'`` (reference), ``'bnb'`` (bitsandbytes kernel) or
            ``'auto'`` (bitsandbytes when installed, else torch).

    Returns:
        Tensor of ``state.shape`` and ``dtype`` on ``packed.device``.
    """
    dtype = dtype or state.dtype
    absmax = first_level_absmax(state)
    # 'auto' prefers the bitsandbytes kernel on every device: it returns the
    # same values (tests compare them) and is 5-10x faster than the torch path
    # on CPU (bench/results/quant-cpu.md), several times on CUDA.
    if backend == "bnb" or backend == "auto":
        out = _bnb_dequantize(packed, state, absmax, dtype)
        if out is not None:
            return out
        if backend == "bnb":
            raise InputError("backend='bnb' was requested but bitsandbytes is not installed.")
    elif backend not in ("auto", "torch"):
        raise InputError(f"Unknown dequantize backend {backend!r}; valid choices are 'auto', 'torch' or 'bnb'.")
    n = state.numel
    bs = state.blocksize
    code = code4(state.quant_type, packed.device)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    flat = packed.reshape(-1)
    step = max(bs, (QUANTIZE_CHUNK // bs) * bs)
    for start in range(0, n, step):
        stop = min(start + step, n)
        b = flat[start // 2 : (stop + 1) // 2]
        idx = torch.stack(((b >> 4), (b & 0xF)), dim=1).view(-1)[: stop - start].long()
        vals = code[idx]
        del idx
        nb = (stop - start + bs - 1) // bs
        scale = absmax[start // bs : start // bs + nb]
        pad = (-(stop - start)) % bs
        vals = torch.nn.functional.pad(vals, (0, pad)).view(nb, bs) * scale.unsqueeze(1)
        out[start:stop] = vals.view(-1)[: stop - start]
    return out.view(state.shape)
