"""Causal-LM cross-entropy from hidden states, optionally in token chunks.

The standard path (transformers' loss) materializes logits for every token:
``tokens x vocab`` in bf16, then an fp32 upcast, then the softmax gradient --
about 10-12 bytes per (token, vocab) element, 2.9 GiB for 2,048 tokens of
Llama-3's 128k vocabulary. That is often the peak of a QLoRA step.

The chunked path computes logits and loss for ``chunk_tokens`` rows at a time
under non-reentrant activation checkpointing, so autograd keeps only each
chunk's *input* rows (already alive as the final hidden state) and backward
recomputes one chunk's logits at a time: the logits term shrinks from
tokens x V to chunk x V, for one extra head matmul per chunk in backward.
Only positions that carry a label are fed to the head at all, which also
saves the prompt tokens' share of compute under completion-only loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ w.t()).float()  # explicit fp32 for the softmax: bf16 log-sum-exp loses ~3 digits
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, y, reduction="sum")


def causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of target tokens.

    Args:
        hidden: (batch, seq, hidden) final hidden states (after the final norm).
        head_weight: (vocab, hidden) output projection, in its own 16-bit dtype.
        labels: (batch, seq) int64 token ids, ``-100`` where there is no loss;
            position t is predicted from position t-1 (the shift happens here).
        chunk_tokens: rows per chunk; ``None`` computes all logits at once.
        softcap: final-logit soft-capping (Gemma-2), ``None`` for none.

    Returns:
        (loss_sum: fp32 scalar, n_targets: int). Divide by the number of
        target tokens of the whole optimizer step, not of this micro-batch,
        so the result does not depend on how a batch is split.
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    n = int(keep.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = h.index_select(0, keep)  # (n_targets, hidden): the only rows the head needs
    y = y.index_select(0, keep)
    w = head_weight.to(h.dtype) if head_weight.dtype != h.dtype else head_weight
    if chunk_tokens is None or n <= chunk_tokens:
        return _chunk_loss(h, w, y, softcap), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, h[sl], w, y[sl], softcap, use_reentrant=False)
    return total, n
