"""Chunked cross-entropy equals the unchunked loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from qlora.loss import causal_lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_equals_reference(chunk, softcap):
    h = torch.randn(3, 40, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 40))
    y[:, :5] = -100
    y[1, 20:] = -100
    # reference: full logits, shift, mean over targets (transformers' definition)
    logits = (h @ w.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    g_ref = torch.autograd.grad(ref, (h, w))
    loss, n = causal_lm_loss(h, w, y, chunk, softcap)
    g = torch.autograd.grad(loss, (h, w))
    assert n == int((y[:, 1:] != -100).sum())
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_targets_gives_zero_with_graph():
    h = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = causal_lm_loss(h, torch.randn(10, 8), torch.full((1, 4), -100))
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # still differentiable, so accumulation code needs no special case


def test_chunked_never_holds_full_logits():
    """Peak live memory of the chunked backward stays far below tokens x vocab."""
    from torch.autograd.graph import saved_tensors_hooks

    h = torch.randn(1, 513, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    y = torch.randint(0, 1000, (1, 513))
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = causal_lm_loss(h, w, y, 64)
    assert max(saved) < 64 * 1000  # nothing of size tokens x vocab (512 x 1000) is kept for backward
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        causal_lm_loss(h, w, y, None)
    assert max(saved) >= 512 * 1000  # while the unchunked path keeps the full logits
