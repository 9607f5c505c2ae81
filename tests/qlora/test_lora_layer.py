"""LoRALinear and DoRALinear: forward formula, closed-form gradients, init, variants (rsLoRA, DoRA, LoRA-FA)."""

import math

import pytest
import torch
from torch import nn

from layers import AdapterLinear, DoRALinear, LoRALinear, base_weight
from quant import InputError, NF4Linear


def _layer(base=None, rank=4, alpha=8.0, cls=LoRALinear, **kw):
    base = base if base is not None else nn.Linear(24, 20, bias=True)
    m = cls(base, rank, alpha, dtype=torch.float32, **kw)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.1)  # non-zero B so the adapter path is exercised
    return m


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_forward_equals_formula(use_rslora, nf4):
    lin = nn.Linear(64, 48, bias=True)
    base = NF4Linear.from_linear(lin, compute_dtype=torch.float32) if nf4 else lin
    m = _layer(base, rank=8, alpha=16.0, use_rslora=use_rslora)
    s = 16.0 / math.sqrt(8) if use_rslora else 16.0 / 8
    assert m.scale == pytest.approx(s)
    x = torch.randn(3, 5, 64)
    w0 = base_weight(base, torch.float32)
    a, b = m.lora_A.weight, m.lora_B.weight
    expect = x @ w0.T + base.bias + s * (x @ a.T @ b.T)
    torch.testing.assert_close(m(x), expect, rtol=1e-5, atol=1e-5)


def test_gradients_equal_closed_forms():
    m = _layer(rank=4, alpha=12.0)
    x = torch.randn(7, 24)
    g = torch.randn(7, 20)  # dL/dh for L = sum(g * h)
    (m(x) * g).sum().backward()
    s, a, b = m.scale, m.lora_A.weight.detach(), m.lora_B.weight.detach()
    # batched closed forms: dL/dB = s·g·(Ax)^T, dL/dA = s·B^T·g·x^T summed over the batch
    torch.testing.assert_close(m.lora_B.weight.grad, s * g.T @ (x @ a.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.lora_A.weight.grad, s * b.T @ g.T @ x, rtol=1e-5, atol=1e-6)
    assert m.base_layer.weight.grad is None and m.base_layer.bias.grad is None
    assert not m.base_layer.weight.requires_grad


def test_nothing_of_base_trainable_and_nf4_backward():
    base = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    m = _layer(base)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 32)
    (m(x) * g).sum().backward()
    w0 = base_weight(base, torch.float32)
    expect_dx = g @ (w0 + m.delta_weight().detach())
    torch.testing.assert_close(x.grad, expect_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_unchanged_at_init(init):
    base = nn.Linear(256, 40)
    m = LoRALinear(base, 16, 32.0, init=init)
    assert torch.count_nonzero(m.lora_B.weight) == 0
    a = m.lora_A.weight.float()
    if init == "kaiming":  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)), as PEFT uses
        bound = 1 / math.sqrt(256)
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    else:
        assert a.std().item() == pytest.approx(1 / 16, rel=0.1)
    x = torch.randn(5, 256)
    assert torch.equal(m(x), base(x))


def test_defaults_bf16_adapter_and_output_dtype():
    base = NF4Linear.from_linear(nn.Linear(64, 32))  # bf16 compute
    m = LoRALinear(base, 4, 8.0)
    assert m.lora_A.weight.dtype == torch.bfloat16 and m.lora_B.weight.dtype == torch.bfloat16
    assert m(torch.randn(2, 64)).dtype == torch.bfloat16
    m32 = LoRALinear(nn.Linear(64, 32), 4, 8.0, dtype=torch.float32)
    assert m32.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank_is_input_error(rank):
    with pytest.raises(InputError, match="rank"):
        LoRALinear(nn.Linear(8, 8), rank, 8.0)


def test_bad_init_and_dropout():
    with pytest.raises(InputError, match="init"):
        LoRALinear(nn.Linear(8, 8), 2, 4.0, init="xavier")
    with pytest.raises(InputError, match="dropout"):
        LoRALinear(nn.Linear(8, 8), 2, 4.0, dropout=1.0)


def test_dropout_only_in_training():
    m = _layer(dropout=0.5)
    x = torch.randn(16, 24)
    m.eval()
    torch.testing.assert_close(m(x), m.base_layer(x) + x @ m.delta_weight().T, rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5, True)
    torch.testing.assert_close(out, m.base_layer(x) + xd @ m.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_disabled_and_passthrough():
    m = _layer()
    x = torch.randn(3, 24)
    assert m.set_enabled(False) is True and not m.enabled
    assert torch.equal(m(x), m.base_layer(x))
    assert m.set_enabled(True) is False and m.enabled
    assert not torch.equal(m(x), m.base_layer(x))
    m.clear()
    assert m.lora_A is None and m.lora_B is None and not m.has_adapter
    assert torch.equal(m(x), m.base_layer(x))


# ---------------------------------------------------------------- DoRA


def test_dora_unchanged_at_init_even_in_bf16():
    base = NF4Linear.from_linear(nn.Linear(64, 48))
    m = DoRALinear(base, 4, 8.0)  # bf16 adapter, bf16 compute
    assert isinstance(m, AdapterLinear) and not isinstance(m, LoRALinear)  # its own class, found by the base type
    assert m.lora_magnitude_vector.dtype == torch.float32
    x = torch.randn(3, 64)
    assert torch.equal(m(x), base(x))


def test_dora_forward_formula_and_detached_norm():
    m = _layer(nn.Linear(24, 20, bias=True), rank=4, alpha=8.0, cls=DoRALinear)
    with torch.no_grad():
        m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(20))
    x = torch.randn(5, 24)
    w = m.base_layer.weight + m.delta_weight()
    norm = w.norm(dim=1)
    expect = x @ (m.lora_magnitude_vector[:, None] * w / norm[:, None]).T + m.base_layer.bias
    out = m(x)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.weight_norm(), norm.detach(), rtol=1e-6, atol=1e-6)
    # The norm is a constant in backward: dL/dB is then (m/‖·‖)·s·g·(Ax)^T, exactly as for LoRA with a row scale.
    g = torch.randn(5, 20)
    (out * g).sum().backward()
    ratio = (m.lora_magnitude_vector / norm).detach()
    a = m.lora_A.weight.detach()
    torch.testing.assert_close(m.lora_B.weight.grad, m.scale * (g * ratio).T @ (x @ a.T), rtol=1e-4, atol=1e-6)
    # dL/dm = sum over batch of g * (W'x)/‖·‖ with W' = W0 + sBA
    expect_dm = (g * (x @ (w / norm[:, None]).T)).sum(0).detach()
    torch.testing.assert_close(m.lora_magnitude_vector.grad, expect_dm, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- LoRA-FA


def test_lora_fa_freezes_A():
    from qlora.lora.surgery import apply_lora, lora_parameters

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    report = apply_lora(model, ["0", "2"], rank=2, alpha=4.0, freeze_A=True, dtype=torch.float32)
    params = lora_parameters(model)
    assert len(params) == 2 and all(p.shape[1] == 2 for p in params)  # the two B matrices
    assert report.trainable == 2 * (16 + 8)  # r·d_out per module
    assert report.adapter_params == 2 * (16 + 16) + 2 * (16 + 8)
    with torch.no_grad():
        for p in params:
            p.normal_()
    model(torch.randn(4, 16)).sum().backward()
    assert model[0].lora_A.weight.grad is None and model[0].lora_B.weight.grad is not None
