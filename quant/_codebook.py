"""The lookup tables behind 4-bit and 8-bit blockwise quantization.

Each table maps a small integer code to a float in [-1, 1]; a block of real
values is divided by its absolute maximum and each value is replaced by the
index of the nearest table entry. The tables below are the ones bitsandbytes
uses, so files are interchangeable.
"""

from __future__ import annotations

import functools

import torch

from .formats import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES  # noqa: F401  (re-exported)

# NormalFloat4: 16 quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero
# (QLoRA paper, section 3). Index order equals value order.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1 without inf/nan): bit 3 is the sign; the low three bits index
# these magnitudes, divided by 12. Index order is *not* value order.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE: tuple[float, ...] = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(
    -m / 12.0 for m in _FP4_MAGNITUDES
)



@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    table = NF4_CODE if quant_type == "nf4" else FP4_CODE
    return torch.tensor(table, dtype=torch.float32)


def code4(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table for ``quant_type`` ('nf4' or 'fp4') on ``device``."""
    return _code_cpu(quant_type).to(device)


@functools.cache
def _sorted4_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.argsort(code)
    sorted_code = code[order]
    # Thresholds are the midpoints between neighbouring values, computed in
    # float32 exactly as bitsandbytes does; a value equal to a midpoint goes
    # to the lower code.
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints, order.to(torch.uint8)


def midpoints4(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(15 float32 thresholds in value order, uint8 map from value rank to code index)."""
    mid, order = _sorted4_cpu(quant_type)
    return mid.to(device), order.to(device)


@functools.cache
def _dynamic_cpu() -> torch.Tensor:
    # The signed "dynamic" 8-bit map (Dettmers 2015, arXiv 1511.04561): a
    # sign, a unary-coded decimal exponent 10^-6..10^0 and a linear fraction
    # whose width grows with the exponent. Exponent e (0..6) contributes
    # 2^e fractions: midpoints of linspace(0.1, 1, 2^e + 1), scaled by
    # 10^(e-6). Plus 0 and 1.0, and one extra 0 to fill 256 slots.
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic map used for double quantization (float32, sorted)."""
    return _dynamic_cpu().to(device)
