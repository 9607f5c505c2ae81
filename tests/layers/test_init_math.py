"""layers.inits: PiSSA and OLoRA against PEFT's own inits (the oracle), LoftQ's error against plain NF4."""

import copy

import pytest
import torch
from torch import nn

from layers.inits import loftq, nonzero, olora, pissa
from quant import InputError
from quant.blockwise import dequantize_4bit, quantize_4bit


def _peft_init(w: torch.Tensor, init: str, r: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            self.lin.weight.data.copy_(w)

        def forward(self, x):
            return self.lin(x)

    m = get_peft_model(One(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init))
    lin = m.base_model.model.lin
    return lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.base_layer.weight


@pytest.mark.parametrize("alpha", [8.0, 16.0, 3.0])
def test_pissa_is_peft_pissa(alpha):
    w = torch.randn(48, 40)
    a, b, res = pissa(w, 8, alpha / 8)
    pa, pb, pres = _peft_init(w, "pissa", 8, alpha)
    torch.testing.assert_close((a, b, res), (pa, pb, pres), rtol=0, atol=1e-5)
    torch.testing.assert_close(res + alpha / 8 * b @ a, w, rtol=0, atol=1e-5)  # the layer starts at W


def test_olora_is_peft_olora_where_peft_scales_alike():
    """PEFT's OLoRA does not divide by the scale, so the two agree at alpha = r; at any alpha ours starts at W."""
    w = torch.randn(40, 56)
    a, b, res = olora(w, 8, 1.0)
    torch.testing.assert_close((a, b, res), _peft_init(w, "olora", 8, 8.0), rtol=0, atol=1e-5)
    a, b, res = olora(w, 8, 4.0)
    torch.testing.assert_close(res + 4.0 * b @ a, w, rtol=0, atol=1e-5)


def test_pissa_niter_approximates_the_exact_svd():
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    w = u[:, :48] @ torch.diag(torch.logspace(1, -2, 48)) @ v.T  # a decaying spectrum, as real weights have
    a, b, _ = pissa(w, 4, 2.0)
    a2, b2, _ = pissa(w, 4, 2.0, niter=16)
    rel = torch.linalg.norm(b2 @ a2 - b @ a) / torch.linalg.norm(b @ a)
    assert rel < 0.02, rel


def _nf4(w):
    packed, state = quantize_4bit(w.to(torch.bfloat16), "nf4", 64, True)
    return dequantize_4bit(packed, state, torch.float32)


def test_loftq_leaves_less_error_than_quantizing_and_less_with_more_iterations():
    torch.manual_seed(0)
    w = torch.randn(128, 96) * 0.05
    plain = torch.linalg.norm(w - _nf4(w))
    errors = []
    for iters in (1, 2, 4):
        a, b, r = loftq(w, 8, 2.0, _nf4, iters)
        errors.append(float(torch.linalg.norm(w - (_nf4(r) + 2.0 * b @ a))))  # the installed base is quantize(r)
    assert errors[0] < plain and errors[2] <= errors[1] <= errors[0]


def test_a_rank_beyond_the_layer_is_refused_with_its_bounds():
    with pytest.raises(InputError, match="rank 40 does not fit a \\(32, 16\\) layer.*between 1 and 16"):
        pissa(torch.randn(32, 16), 40, 1.0)
    with pytest.raises(InputError, match="at least one iteration"):
        loftq(torch.randn(32, 16), 4, 1.0, copy.copy, 0)


def test_loftq_fits_fp4_too():
    def fp4(w):
        packed, state = quantize_4bit(w.to(torch.bfloat16), "fp4", 64, True)
        return dequantize_4bit(packed, state, torch.float32)

    torch.manual_seed(1)
    w = torch.randn(96, 64) * 0.05
    a, b, r = loftq(w, 8, 1.0, fp4, 2)
    assert torch.linalg.norm(w - (fp4(r) + b @ a)) < torch.linalg.norm(w - fp4(w))


def test_nonzero_starts_at_w_with_balanced_factors_of_the_asked_size():
    w = torch.randn(256, 192) * 0.02
    for ratio in (0.01, 0.1):
        a, b, res = nonzero(w, 16, 2.0, ratio, torch.Generator().manual_seed(0))
        torch.testing.assert_close(res + 2.0 * b @ a, w, rtol=0, atol=1e-6)  # the layer starts at W
        assert float(a.std()) == pytest.approx(float(b.std()), rel=0.05) and (a != 0).all() and (b != 0).all()
        update_rms = float((2.0 * b @ a).pow(2).mean().sqrt())
        assert update_rms == pytest.approx(ratio * float(w.pow(2).mean().sqrt()), rel=0.05)
    again = nonzero(w, 16, 2.0, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], nonzero(w, 16, 2.0, 0.1, torch.Generator().manual_seed(0))[0])
    with pytest.raises(InputError, match="positive number"):
        nonzero(w, 16, 2.0, 0.0)
