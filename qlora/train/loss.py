"""Causal-LM cross-entropy from hidden states, fused with its gradient, in token chunks.

The standard path (transformers' loss) materializes logits for every token:
``tokens x vocab`` in bf16, then an fp32 upcast, then the softmax gradient --
about 10-12 bytes per (token, vocab) element, 2.9 GiB for 2,048 tokens of
Llama-3's 128k vocabulary. That is often the peak of a QLoRA step.

Here the head, the softmax and its gradient run together, ``chunk_tokens``
rows at a time, inside the *forward* pass: for each chunk we compute the
logits, the loss, and at once ``d loss / d hidden = (softmax - onehot) @ W``,
then drop the chunk's logits. Autograd keeps only that (tokens x hidden)
gradient, 1/30 of the logits' size for Llama-3, and backward just scales it
by the incoming gradient. The trade-offs, named:

* No logits are ever saved or recomputed: at most one chunk's, 6 bytes per
  element at the worst moment (8 with soft-capping), exist at a time. An
  earlier version checkpointed each chunk and recomputed its logits in
  backward; fusing saves that extra head matmul (2 x tokens x hidden x vocab
  FLOPs, a third of the head's work).
* The gradient is computed even if nobody calls ``backward`` -- so it is
  skipped when grad mode is off or nothing requires grad (evaluation).
* The gradient of the head weight, when the head is trainable (not in
  QLoRA's default), accumulates in a (vocab x hidden) fp32 buffer during the
  forward pass.

Only positions that carry a label are fed to the head at all, which also
saves the prompt tokens' share of compute under completion-only loss.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE = -100  # label of a position with no loss (PyTorch's and transformers' ignore_index); the one definition
CHUNK_TOKENS = 1024  # rows per chunk in the trainer's chunked loss; the planner is told the same number


def targets_per_row(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens of each row of ``labels`` ``(rows, seq)``, int64 ``(rows,)``.

    The one rule for what the loss counts: labels are shifted by one (position
    ``t`` predicts ``t + 1``), so position 0 never counts, nor does ``IGNORE``.
    """
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def _chunk_loss_and_grad(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None,
                         want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk (fp32 0-dim) and ``d loss / d logits`` in ``w.dtype`` (or ``None``).

    Every step after the head matmul is in place on one fp32 (k, vocab)
    buffer; the 16-bit logits live only until their fp32 copy exists.
    """
    logits = h @ w.t()  # (k, V) in the 16-bit compute dtype
    # explicit fp32 for the softmax: a bf16 log-sum-exp over 128k entries loses ~3 digits
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    del logits
    t = None
    if softcap:
        t = z.div_(softcap).tanh_()  # z is now tanh(logits / c); keep it for the derivative
        z = t * softcap
    rows = torch.arange(z.shape[0], device=z.device)
    target = z[rows, y]
    m = z.amax(dim=1)
    z.sub_(m[:, None]).exp_()
    s = z.sum(dim=1)
    loss = (s.log() + m - target).sum()
    if not want_grad:
        return loss, None
    p = z.div_(s[:, None])  # softmax
    p[rows, y] -= 1.0  # d CE / d (capped) logits
    if t is not None:
        p.mul_(t.square_().neg_().add_(1.0))  # d c*tanh(x/c) / dx = 1 - tanh^2
        del t
    return loss, p.to(w.dtype)


class _FusedLinearCE(torch.autograd.Function):
    """``sum CE(h @ w.T, y)`` whose forward also computes the gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, softcap, need_h: bool, need_w: bool):
        n = h.shape[0]
        want = need_h or need_w
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 accumulation across chunks for a trainable 16-bit head (V x H x 4 bytes)
        grad_w = (
            torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) if need_w else None
        )
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            loss, g = _chunk_loss_and_grad(h[sl], w, y[sl], softcap, want)
            total += loss
            if need_h:
                torch.matmul(g, w, out=grad_h[sl])  # (k, V) @ (V, H), written straight into the buffer
            if need_w:
                grad_w += g.t() @ h[sl]  # in-place add casts on the fly: no fp32 copy of the (V, H) partial
            del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second derivative through the loss
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None  # stays 16-bit: a 0-dim fp32 factor does not promote
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


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
    grad_on = torch.is_grad_enabled()
    chunk = n if chunk_tokens is None else min(n, chunk_tokens)
    return _FusedLinearCE.apply(h, w, y, chunk, softcap, grad_on and h.requires_grad, grad_on and w.requires_grad), n


def target_count(labels: torch.Tensor) -> int:
    """Target tokens of a whole micro-batch (:func:`targets_per_row` summed), a host int."""
    return int(targets_per_row(labels).sum())  # a host sync when labels live on a GPU: callers pass counts instead


def forward_loss(model, batch: dict, chunk_tokens: int | None, autocast_dtype: torch.dtype,
                 n_targets: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed loss over one micro-batch and its target-token count.

    ``chunk_tokens`` set: :func:`qlora.train.loss.causal_lm_loss` on the final
    hidden states (never materializes all logits). ``None``: transformers'
    own loss on full fp32 logits (the standard path), asked for a sum through
    ``num_items_in_batch`` so that normalization stays with the caller.
    ``n_targets`` is the micro-batch's target count when the caller knows it
    (the trainer counts on its host rows); ``None`` counts ``batch['labels']``,
    a host sync on a GPU.
    """
    device_type = batch["input_ids"].device.type
    # float32 "autocast" is no autocast (CPU autocast refuses it with a warning)
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        if chunk_tokens is None:
            n = target_count(batch["labels"]) if n_targets is None else n_targets
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False, num_items_in_batch=max(n, 1))
            return out.loss * max(n, 1), n
        out = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        # causal_lm_loss picks the target rows with nonzero(): one host sync per micro-batch (a data-dependent
        # shape), the price of never running the head on prompt tokens
        return causal_lm_loss(out[0], model.get_output_embeddings().weight, batch["labels"], chunk_tokens, softcap)
