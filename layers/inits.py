"""Initializations that move the base: PiSSA, OLoRA and LoftQ, as plain tensor math.

The usual init (A random, B zero) leaves the base alone and starts the update
at zero. These three instead put part of the weight ``W`` into the adapter
and leave the rest as the frozen base, chosen so that at step 0
``base + s·B·A`` is ``W`` (PiSSA, OLoRA) or as close to ``W`` as the 4-bit
format allows (LoftQ):

* **PiSSA**: the top-r singular triplets of ``W`` go into the adapter
  (``B = U_r·sqrt(S_r/s)``, ``A = sqrt(S_r/s)·V_r^T``) and the residual
  ``W - s·B·A`` is the base. On an NF4 base the residual is what gets
  quantized: it has the small singular values only, so the 4-bit error is
  smaller than quantizing ``W``.
* **OLoRA**: from the QR decomposition ``W = Q·R``: ``B = Q[:, :r]/sqrt(s)``,
  ``A = R[:r]/sqrt(s)``, residual ``W - s·B·A``.
* **nonzero**: A and B both Gaussian with one std, scaled so the starting
  update's RMS is a set fraction of ``W``'s; the residual ``W - s·B·A`` is
  the base, so the layer still starts at ``W``.
* **LoftQ**: alternate ``Q = quantize(W - s·B·A)`` and
  ``(B, A) = the best rank-r fit of W - Q`` for ``iters`` rounds; the base is
  ``Q`` and the adapter soaks up the quantization error.

Every function takes the ``(out, in)`` weight and returns float32 ``A`` ``(r, in)``,
``B`` ``(out, r)`` and the new base weight ``(out, in)`` (for LoftQ, the weight whose
quantization is the base). ``s`` is the layer's
scale (alpha/r, or alpha/sqrt(r) with rsLoRA): the factors are divided by
``sqrt(s)`` so that the layer's forward, which multiplies by ``s``, reproduces
the intended product. (PEFT's OLoRA and LoftQ do not divide, which is the same
only when alpha = r; its PiSSA divides S by s, as here.)

Costs: one float32 copy of ``W`` plus its SVD or QR workspace per layer
(PiSSA's full SVD: about ``3·out·in`` floats; ``niter`` uses a randomized
rank-r SVD instead, ``O((out+in)·r)`` extra), one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quant.errors import InputError

INITS_FROM_WEIGHTS = ("pissa", "olora", "loftq", "nonzero")
NONZERO_RATIO = 0.1  # nonzero: the starting update's RMS as a fraction of the weight's


def _check(w: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    if w.ndim != 2:
        raise InputError(f"An init from the weights needs a 2-D (out, in) weight, got shape {tuple(w.shape)}.")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= min(w.shape):
        raise InputError(
            f"LoRA rank {rank!r} does not fit a {tuple(w.shape)} layer: an r above the layer's smaller side adds "
            f"nothing a rank-{min(w.shape)} update cannot hold (and PiSSA, OLoRA and LoftQ take r of its singular or "
            f"QR directions), so r must be between 1 and {min(w.shape)}."
        )
    if not scale > 0:
        raise InputError(f"The LoRA scale must be positive, got {scale!r}.")
    return w.detach().to(torch.float32)


def pissa(w: torch.Tensor, rank: int, scale: float, niter: int | None = None):
    """PiSSA: ``(A, B, residual)``, the top-``rank`` singular directions in the adapter.

    Args:
        niter: None for the exact SVD; else ``torch.svd_lowrank`` with that many subspace iterations
            (much less memory and time on large layers, approximate).
    """
    w = _check(w, rank, scale)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.T
    root = (s / scale).sqrt()
    a, b = root[:, None] * vh, u * root[None, :]
    return a.contiguous(), b.contiguous(), w - scale * (b @ a)  # LAPACK's U is column-major


def olora(w: torch.Tensor, rank: int, scale: float):
    """OLoRA: ``(A, B, residual)`` from ``W = Q·R``: the first ``rank`` orthonormal columns and their rows of R."""
    w = _check(w, rank, scale)
    q, r = torch.linalg.qr(w)
    root = scale**0.5
    a, b = r[:rank] / root, q[:, :rank] / root
    return a.contiguous(), b.contiguous(), w - scale * (b @ a)


def nonzero(w: torch.Tensor, rank: int, scale: float, ratio: float = NONZERO_RATIO,
            generator: torch.Generator | None = None):
    """Both factors Gaussian: ``(A, B, residual)``, with ``residual = W - s·B·A`` so the layer starts at ``W``.

    A and B get one std ``σ`` each, chosen so that the starting update ``s·B·A`` (whose entries have
    variance ``s²·r·σ⁴``) has RMS ``ratio·RMS(W)``: ``σ = sqrt(ratio·RMS(W) / (s·sqrt(r)))``. Balanced
    factors give both A and B a gradient from the first step (with B at zero, A's is zero). Draws on the
    CPU (torch's generator, or ``generator``), so a seed gives the same factors on every device.

    Raises:
        InputError: see the module; a ratio that is not a positive number.
    """
    w = _check(w, rank, scale)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
        raise InputError(f"The nonzero init's ratio must be a positive number, got {ratio!r} (lora.nonzero_ratio).")
    rms = float(w.pow(2).mean().sqrt())
    sigma = (ratio * rms / (scale * rank**0.5)) ** 0.5
    a = torch.randn(rank, w.shape[1], generator=generator).mul_(sigma).to(w.device)
    b = torch.randn(w.shape[0], rank, generator=generator).mul_(sigma).to(w.device)
    return a, b, w - scale * (b @ a)


def loftq(w: torch.Tensor, rank: int, scale: float, quantize: Callable[[torch.Tensor], torch.Tensor],
          iters: int = 1):
    """LoftQ: ``(A, B, R)``: the base is ``Q = quantize(R)``, and ``s·B·A`` the rank-``rank`` fit of ``W - Q``.

    ``R`` (``W`` minus the previous round's fit) is returned rather than ``Q`` because the 4-bit formats
    are not idempotent (quantizing a dequantized weight can move it a step): the caller installs
    ``quantize(R)`` again, bit for bit the ``Q`` the adapter was fitted to.

    Args:
        quantize: ``(out, in)`` float32 -> the same weight after the base's 4-bit round trip
            (quantize, then dequantize), float32.
        iters: alternations, >= 1 (the first quantizes ``W`` itself).

    Raises:
        InputError: see the module; ``iters`` < 1.
    """
    w = _check(w, rank, scale)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise InputError(f"LoftQ needs at least one iteration, got {iters!r} (recipe key lora.loftq_iters).")
    lowrank = torch.zeros_like(w)
    for _ in range(iters):
        base = w - lowrank
        u, s, vh = torch.linalg.svd(w - quantize(base), full_matrices=False)
        root = (s[:rank] / scale).sqrt()
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
        lowrank = scale * (b @ a)
    return a.contiguous(), b.contiguous(), base
