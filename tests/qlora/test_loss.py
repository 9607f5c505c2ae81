"""Chunked cross-entropy equals the unchunked loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from qlora.train.loss import causal_lm_loss


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


def test_nothing_vocab_sized_is_saved_for_backward():
    """Autograd keeps only the (targets x hidden) gradient, chunked or not: no logits survive the forward."""
    from torch.autograd.graph import saved_tensors_hooks

    h = torch.randn(1, 513, 16, requires_grad=True)
    w = torch.randn(1000, 16)
    y = torch.randint(0, 1000, (1, 513))
    for chunk in (64, None):
        saved = []
        with saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            causal_lm_loss(h, w, y, chunk)
        assert max(saved) == 512 * 16  # the gradient rows; 512 x 1000 logits were never kept


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_peak_live_memory_is_one_chunk_of_logits(softcap):
    """Measured peak of live tensors in forward + backward: 6 bytes per logit of one chunk (8 with soft-capping)."""
    from memory.tracker import LiveTensorTracker

    n, hid, vocab, chunk = 1025, 16, 4000, 128
    h = torch.randn(1, n, hid, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hid, dtype=torch.bfloat16)
    y = torch.randint(0, vocab, (1, n))
    with LiveTensorTracker("cpu") as tr:
        loss, _ = causal_lm_loss(h, w, y, chunk, softcap)
        loss.backward()
    per_logit = 8 if softcap else 6
    rows = (n - 1) * hid * 2
    assert tr.peak <= per_logit * chunk * vocab + 4 * rows + 64 * n
    assert tr.peak >= per_logit * chunk * vocab  # the bound is tight: the worst moment really holds that much
    assert tr.peak < 2 * (n - 1) * vocab  # far below the bf16 logits of all tokens, let alone their fp32 copy


def test_eval_skips_the_gradient():
    """Under no_grad the fused loss computes the loss only and saves nothing."""
    h = torch.randn(2, 30, 8)
    w = torch.randn(50, 8)
    y = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        loss, n = causal_lm_loss(h, w, y, 7)
    ref = F.cross_entropy((h[:, :-1] @ w.t()).reshape(-1, 50), y[:, 1:].reshape(-1), reduction="sum")
    assert n == 58 and not loss.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_bf16_matches_autograd_through_full_logits():
    """The 16-bit path (the trainer's) against autograd through full fp32-upcast logits: same loss and gradients."""
    torch.manual_seed(0)
    h = (torch.randn(2, 65, 32) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(300, 32) * 0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 300, (2, 65))
    ref = F.cross_entropy((h[:, :-1] @ w.t()).float().reshape(-1, 300), y[:, 1:].reshape(-1), reduction="sum")
    g_ref = torch.autograd.grad(ref / 128, (h, w))
    loss, n = causal_lm_loss(h, w, y, 16)
    g = torch.autograd.grad(loss / n, (h, w))
    assert n == 128 and g[0].dtype == g[1].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-3)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
