"""The planner's measured constants against a fresh measurement (memory.tracker on the CPU)."""

import pytest
import torch

from memory.terms import QUANTIZE_TRANSIENT, quantize_transient_bytes
from memory.tracker import LiveTensorTracker
from quant.blockwise import quantize_4bit
from quant.formats import QUANTIZE_CHUNK


@pytest.mark.parametrize("shape", [(256, 64), (1024, 1024)])
def test_quantize_transient_bounds_what_quantize_4bit_allocates(shape):
    """Loading quantizes each weight in chunks; the planner's ``load`` phase prices the temporaries per element
    (QUANTIZE_TRANSIENT, 12.5 B): within 10% above the measured 12.1 B, never below."""
    quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16))  # the 8-bit table is built once per process
    x = torch.randn(*shape, dtype=torch.bfloat16)
    tracker = LiveTensorTracker("cpu")
    with tracker:
        result = quantize_4bit(x)
        kept = tracker.current  # the packed codes and scales: the weight itself, not a transient
    transient = tracker.peak - kept
    del result
    assert transient <= quantize_transient_bytes(x.numel(), "cpu") <= 1.1 * transient
    assert quantize_transient_bytes(x.numel(), "cuda") == quantize_transient_bytes(x.numel(), "cpu") + 2 * x.numel()


def test_quantize_transient_stops_growing_at_one_chunk():
    big = 3 * QUANTIZE_CHUNK
    assert quantize_transient_bytes(big, "cpu") == int(QUANTIZE_TRANSIENT * QUANTIZE_CHUNK)
