"""Bit-exactness of quant's torch path against bitsandbytes (the oracle)."""

import itertools

import bitsandbytes.functional as bnbf
import pytest
import torch

from quant import InputError, bits_per_param, dequantize_4bit, quantize_4bit
from quant._codebook import dynamic_code
from quant.blockwise import quantize_8bit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# odd sizes, sizes below one block, sizes that are not multiples of the block
# and shapes whose block count crosses the 256-block nested boundary
SHAPES = ((1,), (7,), (63,), (65,), (3, 37), (129, 65), (300, 257), (64, 4096 + 3))


def _both(x, bs, qt, dq):
    q, s = bnbf.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type=qt)
    p, st = quantize_4bit(x, qt, bs, dq)
    return q, s, p, st


def _assert_identical(q, s, p, st, dq):
    assert torch.equal(q, p), f"packed bytes differ at {(q != p).nonzero()[:5].flatten().tolist()}"
    assert torch.equal(s.absmax, st.absmax)
    if dq:
        assert torch.equal(s.offset, st.offset)
        assert torch.equal(s.state2.absmax, st.nested_absmax)
        assert torch.equal(s.state2.code, st.nested_code)
    d_ref = bnbf.dequantize_4bit(q, s)
    d = dequantize_4bit(p, st)
    assert d.dtype == d_ref.dtype and d.shape == st.shape
    assert torch.equal(d.reshape(-1), d_ref.reshape(-1))


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_bit_identical_random(qt, dtype, bs):
    for shape, dq in itertools.product(SHAPES, (True, False)):
        scale = float(torch.rand(()) * 4 + 1e-3)
        x = (torch.randn(shape) * scale).to(dtype)
        _assert_identical(*_both(x, bs, qt, dq), dq)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_bit_identical_edge_values(qt):
    n = 64 * 600 + 5
    cases = [
        torch.zeros(n),  # absmax 0 everywhere
        torch.full((n,), -2.5),  # constant blocks: nested input is all zeros
        torch.randn(n) * torch.logspace(-6, 3, n),  # huge dynamic range across blocks
        torch.linspace(-1, 1, n),  # values sweep every midpoint of the code tables
    ]
    for x, dq in itertools.product(cases, (True, False)):
        for dtype in DTYPES:
            _assert_identical(*_both(x.to(dtype), 64, qt, dq), dq)


def test_chunked_path_matches_on_large_tensor():
    # > 4M elements: exercises several chunks plus a partial last block
    x = torch.randn(4 * 1024 * 1024 + 4096 + 7).bfloat16()
    _assert_identical(*_both(x, 64, "nf4", True), True)


def test_double_quant_8bit_sweep_matches_lut_kernel():
    # dense sweep of [-1, 1] in blocks that each contain a 1.0 (absmax = 1):
    # catches any deviation from bitsandbytes' binning near midpoints
    v = torch.linspace(-1, 1, 300_001)
    blocks = v.numel() // 255 + 1
    x = torch.zeros(blocks, 256)
    x[:, 0] = 1.0
    body = torch.zeros(blocks * 255)
    body[: v.numel()] = v
    x[:, 1:] = body.view(blocks, 255)
    ref_codes, ref_state = bnbf.quantize_blockwise(x.view(-1), blocksize=256)
    codes, absmax = quantize_8bit(x.view(-1), 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)


@pytest.mark.parametrize("qt,bound,worst", [("nf4", 0.11, 0.153), ("fp4", 0.17, 0.167)])
def test_round_trip_error_bounds(qt, bound, worst):
    x = torch.randn(256, 512)
    p, st = quantize_4bit(x, qt, 64, True)
    err_dq = (dequantize_4bit(p, st) - x).abs()
    assert err_dq.mean() / x.abs().mean() < bound
    p, st = quantize_4bit(x, qt, 64, False)  # exact float32 scales for the worst case
    err = (dequantize_4bit(p, st) - x).abs()
    # relative to its block's absmax, no value is off by more than half the widest
    # gap of the table: (1 - -0.696)/2 = 0.152 for NF4, (1 - 2/3)/2 = 0.167 for FP4
    blocks = x.view(-1, 64).abs().amax(1, keepdim=True)
    assert (err.view(-1, 64) / blocks).max() <= worst


def test_bits_per_param():
    assert round(bits_per_param("nf4", 64, True), 3) == 4.127
    assert bits_per_param("nf4", 64, False) == 4.5
    x = torch.randn(4096, 64 * 256)
    p, st = quantize_4bit(x, "nf4", 64, True)
    stored_bits = 8 * (p.numel() + st.absmax.numel() + 4 * st.nested_absmax.numel())
    assert stored_bits / x.numel() == pytest.approx(bits_per_param("nf4", 64, True), rel=1e-9)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(quant_type="int4"), "'int4'"),
        (dict(blocksize=48), "48"),
        (dict(blocksize=8192), "8192"),
    ],
)
def test_bad_arguments_name_value_and_choices(kwargs, needle):
    with pytest.raises(InputError) as e:
        quantize_4bit(torch.randn(64), **kwargs)
    assert needle in str(e.value) and "valid choices" in str(e.value)


def test_non_floating_tensor_rejected():
    with pytest.raises(InputError, match="int64"):
        quantize_4bit(torch.arange(64))
    with pytest.raises(InputError, match="empty"):
        quantize_4bit(torch.empty(0))
