"""AdapterLinear's operations: install, clear, pass-through, enable, LoRA-FA, merge/unmerge, device, base norm."""

import pytest
import torch
from torch import nn

from layers import AdapterLinear, DoRALinear, LoRALinear, base_weight
from quant import InputError, NF4Linear


def _factors(rank=3, din=24, dout=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, din, generator=g, dtype=dtype), torch.randn(dout, rank, generator=g, dtype=dtype) * 0.1


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_install_copies_factors_in_dtype_next_to_the_base(cls):
    base = nn.Linear(24, 20).eval()
    m = cls(base, 4, 8.0, init=None, dtype=torch.bfloat16)
    assert not m.training  # a new layer starts in its base's mode
    a, b = _factors(rank=3)
    mag = torch.rand(20, dtype=torch.float64) + 0.5 if cls is DoRALinear else None
    m.install(a, b, 6.0, use_rslora=True, magnitude=mag, dropout=0.25, trainable=True, dtype=torch.float16)
    assert m.rank == 3 and m.alpha == 6.0 and m.use_rslora and m.scale == pytest.approx(6.0 / 3**0.5)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float16
    assert torch.equal(m.lora_A.weight, a.half()) and m.lora_A.weight.data_ptr() != a.data_ptr()  # a copy
    assert m.dropout == 0.25 and not m.lora_dropout.training  # follows the layer's eval mode
    assert all(p.requires_grad for _, p in m.adapter_tensors())
    assert not any(p.requires_grad for p in base.parameters())
    kinds = [k for k, _ in m.adapter_tensors()]
    if cls is DoRALinear:
        assert kinds == ["lora_A", "lora_B", "lora_magnitude_vector"]
        assert m.lora_magnitude_vector.dtype == torch.float32  # magnitudes stay float32
    else:
        assert kinds == ["lora_A", "lora_B"]
    m.install(a, b, 6.0, magnitude=mag)  # dtype None keeps the tensors' own; trainable defaults to False
    assert m.lora_A.weight.dtype == torch.float32 and not any(p.requires_grad for _, p in m.adapter_tensors())
    m.train()
    m.install(a, b, 6.0, magnitude=mag, dropout=0.1)
    assert m.lora_dropout.training and m.lora_A.training
    base.eval()  # a base shared with other layers (a multi-adapter bank): install never flips its mode
    m.install(a, b, 6.0, magnitude=mag)
    assert not base.training


def test_install_refuses_bad_input_and_changes_nothing():
    m = LoRALinear(nn.Linear(24, 20), 2, 4.0, dtype=torch.float32)
    before = [p for _, p in m.adapter_tensors()]
    a, b = _factors(rank=3)
    for kwargs, match in [
        (dict(lora_A=a[:, :10], lora_B=b), "in=24, out=20"),
        (dict(lora_A=a, lora_B=b[:, :2]), r"not \(r, in\) and \(out, r\)"),
        (dict(lora_A=a, lora_B=b, magnitude=torch.ones(20)), "DoRALinear"),
        (dict(lora_A=a, lora_B=b, dropout=1.5), r"dropout must be a number in \[0, 1\), got 1.5"),
        (dict(lora_A=a, lora_B=b, dtype=torch.int8), r"\(bfloat16, float16 or float32\), got torch.int8"),
        (dict(lora_A=a[:0], lora_B=b[:, :0]), r"not \(r, in\) and \(out, r\)"),
        (dict(lora_A=a, lora_B=b, alpha="8"), "alpha must be a number"),
    ]:
        kwargs.setdefault("alpha", 8.0)
        with pytest.raises(InputError, match=match):
            m.install(**kwargs)
    assert [p for _, p in m.adapter_tensors()] == before and m.alpha == 4.0
    d = DoRALinear(nn.Linear(24, 20), 2, 4.0, dtype=torch.float32)
    with pytest.raises(InputError, match=r"lora_magnitude_vector of shape \(20,\), got None"):
        d.install(a, b, 8.0)
    with pytest.raises(InputError, match=r"shape \(20,\), got \(7,\)"):
        d.install(a, b, 8.0, magnitude=torch.ones(7))


def test_install_gives_new_parameters_and_matches_the_formula():
    base = nn.Linear(24, 20)
    m = LoRALinear(base, 2, 4.0, dtype=torch.float32)
    old = m.lora_A.weight
    a, b = _factors(rank=5)
    m.install(a, b, 10.0)
    assert m.lora_A.weight is not old
    x = torch.randn(4, 24)
    torch.testing.assert_close(m(x), base(x) + 2.0 * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_clear_and_passthrough_run_the_base_only(cls):
    base = nn.Linear(24, 20)
    m = cls(base, 2, 4.0, dtype=torch.float32)
    m.clear()
    x = torch.randn(3, 24)
    assert not m.has_adapter and not m.active and m.rank == 0 and m.adapter_tensors() == []
    assert torch.equal(m(x), base(x))
    m.freeze_A()  # nothing to freeze: a no-op
    p = cls.passthrough(base)
    assert isinstance(p, cls) and not p.has_adapter and p.base_layer is base
    assert set(p.state_dict()) == {"base_layer.weight", "base_layer.bias"}  # keys never move
    assert torch.equal(p(x), base(x))
    with pytest.raises(InputError, match="nothing to merge"):
        p.merged_weight()


def test_enabled_and_merged_change_only_through_methods():
    m = LoRALinear(nn.Linear(8, 8), 2, 4.0)
    with pytest.raises(AttributeError):
        m.enabled = False
    with pytest.raises(AttributeError):
        m.merged = True
    assert m.set_enabled(False) is True and not m.active
    with pytest.raises(InputError, match="it is disabled"):
        m.merge()
    assert m.set_enabled(True) is False and m.active


def test_freeze_A_is_lora_fa():
    m = DoRALinear(nn.Linear(8, 6), 2, 4.0)
    m.freeze_A()
    assert {k for k, p in m.adapter_tensors() if p.requires_grad} == {"lora_B", "lora_magnitude_vector"}


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("nf4", [False, True])
def test_merge_keep_base_then_unmerge_restores_the_base_object(cls, nf4):
    lin = nn.Linear(64, 48)
    base = NF4Linear.from_linear(lin, compute_dtype=torch.float32) if nf4 else lin
    m = cls(base, 4, 8.0, dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.05)
    x = torch.randn(5, 64)
    ref, w0_norm = m(x), float(base_weight(base).norm())
    assert m.base_norm() == pytest.approx(w0_norm, rel=1e-6)
    m.merge()
    assert m.merged and not m.active and m.can_unmerge and isinstance(m.base_layer, nn.Linear)
    assert m.base_layer is not base and base not in list(m.modules())  # the kept base is not a submodule
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    assert m.base_norm() == pytest.approx(w0_norm, rel=1e-6)  # still W0's, not W''s
    with pytest.raises(InputError, match="already merged"):
        m.merge()
    with pytest.raises(InputError, match="merged layer"):
        m.install(*_factors(rank=2, din=64, dout=48), 1.0, magnitude=torch.ones(48) if cls is DoRALinear else None)
    m.unmerge()
    assert m.base_layer is base and not m.merged and m.active
    assert torch.equal(m(x), ref)
    with pytest.raises(InputError, match="not merged"):
        m.unmerge()


def test_merge_in_place_cannot_be_undone():
    base = nn.Linear(16, 12)
    m = LoRALinear(base, 2, 4.0, dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    w, expect = base.weight, m.merged_weight(torch.float32)
    m.merge(keep_base=False)
    assert m.base_layer is base and base.weight is w and torch.equal(w, expect)
    assert m.merged and not m.can_unmerge
    with pytest.raises(InputError, match="keep_base=False"):
        m.unmerge()


def test_follow_base_device_is_a_no_op_on_the_same_device():
    m = DoRALinear(nn.Linear(8, 6), 2, 4.0)
    before = [(p, p.data_ptr()) for _, p in m.adapter_tensors()]
    m.follow_base_device()
    assert [(p, p.data_ptr()) for _, p in m.adapter_tensors()] == before and m.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_follow_base_device_keeps_the_parameter_objects():
    m = DoRALinear(nn.Linear(8, 6), 2, 4.0)
    params = [p for _, p in m.adapter_tensors()]
    m.base_layer.to("cuda")  # the base moved (as model.to() moves the live layer's base), the adapter did not
    assert m.device.type == "cuda" and all(p.device.type == "cpu" for p in params)
    m.follow_base_device()
    assert [p for _, p in m.adapter_tensors()] == params and all(p.device.type == "cuda" for p in params)


def test_found_by_type():
    assert issubclass(LoRALinear, AdapterLinear) and issubclass(DoRALinear, AdapterLinear)
    assert not issubclass(DoRALinear, LoRALinear) and not issubclass(LoRALinear, DoRALinear)
    assert "dora" in repr(DoRALinear(nn.Linear(8, 6), 2, 4.0))
    assert "dora" not in repr(LoRALinear(nn.Linear(8, 6), 2, 4.0))
