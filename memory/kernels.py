"""Meta-device kernels for the probe: what the target device allocates, not torch's meta fallbacks.

The probe (:mod:`memory.probe`) runs the real model code on the ``meta``
device -- transformers' classes, ``quant.NF4Linear`` and the real adapter
layers of :mod:`layers` -- so only the kernels that have no faithful meta
implementation need stand-ins, and they are here:

- :class:`ProbeNF4Linear`: ``quant.NF4Linear`` with its dequantization
  allocations tagged ``"dequant"`` (the dequantization itself is quant's code);
- :func:`device_sdpa`: ``scaled_dot_product_attention`` routed to what the
  target device runs (FlashAttention-2 or memory-efficient attention on CUDA,
  the fused flash kernel on CPU), which on meta would take the math fallback
  and save an s x s softmax per head;
- :func:`device_dropout`: ``dropout`` as CUDA's fused kernel runs it (a
  1-byte mask) instead of the unfused CPU/meta path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from quant import NF4Linear

from .tracker import LiveTensorTracker


class ProbeNF4Linear(NF4Linear):
    """``quant.NF4Linear`` on meta, with its dequantization allocations tagged ``"dequant"``.

    Dequantization runs quant's own code path (``dequantize_4bit`` with its
    default backend: the bitsandbytes kernel where bitsandbytes is installed,
    whose meta implementation allocates exactly its output, else the chunked
    torch path with its temporaries), so the probe allocates what the device will.
    """

    tracker: LiveTensorTracker | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        ctx = self.tracker.tagged("dequant") if self.tracker is not None else contextlib.nullcontext()
        with ctx:
            return super().dequantize(dtype)


# ---------------------------------------------------------------------------- attention kernels


class _CudaFlash(torch.autograd.Function):
    """FlashAttention-2 through ``aten._scaled_dot_product_flash_attention`` on meta.

    Forward keeps q, k, v, out and an fp32 log-sum-exp (b, heads, s). The
    CUDA backward (flash-attention's ``mha_bwd``) also allocates an fp32
    ``dq_accum`` (b, s, heads, d), an fp32 ``softmax_d`` (b, heads, s) and,
    for grouped-query attention, bf16 ``dk``/``dv`` expanded to all query
    heads before they are summed per group; those are allocated here so the
    probe sees them. (The kernel rounds s up to a multiple of 128 for the
    fp32 buffers; that rounding is ignored: < 128*heads*d*4 bytes.)
    """

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, s, d = q.shape
        # mha_bwd's own buffers, live while the kernel runs
        work = [q.new_empty((b, s, h, d), dtype=torch.float32), q.new_empty((b, h, s), dtype=torch.float32)]
        if k.shape[1] != h:  # GQA: dk/dv for every query head, summed per group afterwards
            work += [q.new_empty((b, s, h, d)), q.new_empty((b, s, h, d))]
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, None, None, s, s, 0.0, ctx.is_causal, seed, seed, scale=ctx.scale
        )
        del work, seed
        return dq, dk, dv, None, None


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``F.scaled_dot_product_attention`` runs on a CUDA GPU, on meta tensors.

    bf16/fp16 without a mask and head_dim <= 256 -> FlashAttention-2 (GQA
    native); with a mask -> memory-efficient attention (no s x s buffer,
    log-sum-exp saved); anything else -> the math path (s x s softmax saved).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    flash_ok = (
        attn_mask is None and dropout_p == 0.0 and query.dtype in (torch.bfloat16, torch.float16)
        and query.shape[-1] <= 256
    )
    if flash_ok:
        return _CudaFlash.apply(query, key, value, bool(is_causal), scale)
    if key.shape[1] != query.shape[1]:  # the efficient kernel has no GQA: expand like the math path does
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # the kernel's additive bias
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, bool(is_causal), scale=scale
    )[0]


def _cpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``F.scaled_dot_product_attention`` runs on CPU: the fused flash kernel for CPU.

    It takes grouped k/v directly and keeps out plus an fp32 log-sum-exp. A boolean mask
    (sliding-window attention past its window) is first turned into an additive one in the
    query's dtype, shaped like the mask after its broadcast (``b x 1 x s x s``; torch's
    ``convert_boolean_attn_mask``), and that copy is what the kernel saves for backward.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(
            attn_mask, 0.0, torch.scalar_tensor(-math.inf, dtype=query.dtype, device=query.device)
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, bool(is_causal), attn_mask=attn_mask, scale=scale
    )[0]


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """Dropout as CUDA runs it: the fused ``native_dropout`` with a bool (1 byte) mask.

    CPU (and meta) take the unfused path instead: a mask in the input's
    dtype, then the product.
    """
    if not training or p == 0.0:
        return _F_DROPOUT(input, p, training, inplace)
    return torch.native_dropout(input, p, True)[0]


_F_DROPOUT = F.dropout


@contextlib.contextmanager
def device_dropout(device: str) -> Iterator[None]:
    """Route ``F.dropout`` (and so ``nn.Dropout``) to the target device's kernel while probing."""
    if device != "cuda":
        yield
        return
    F.dropout = _cuda_dropout
    try:
        yield
    finally:
        F.dropout = _F_DROPOUT


@contextlib.contextmanager
def device_sdpa(device: str) -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the target device's kernel while probing on meta.

    On meta, torch would pick its math fallback (which saves an s x s
    softmax per head); the real devices do not.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _cuda_sdpa if device == "cuda" else _cpu_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
