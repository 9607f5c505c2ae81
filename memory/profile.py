"""Exact activation profiles: dry runs fitted as polynomials in (batch, seq, rank).

Every tensor a step allocates has a size that is a product of the batch
``b``, the sequence length ``s``, the LoRA rank ``r`` and fixed model
dimensions (plus a few ``s + 1``-style sums, e.g. the padded labels). The
live bytes after each event of a dry run (:mod:`memory.probe`) are
therefore an exact polynomial with integer coefficients in the features
``1, b, s, b*s, b*s*r, r, b*s^2, s^2``. A profile runs the probe at a handful
of small shapes, solves for every event's coefficients and requires the
solution to reproduce one more shape *exactly*. Batch 1 is fitted on its
own when it runs different ops (a ``.contiguous()`` that copies only when
``b > 1``); a fit that does not reproduce its check shape falls back to the
full feature set (``s^2`` terms come from eager attention and masks).

Evaluating a profile at any shape is one small matrix product, so the
planner can search hundreds of configurations in milliseconds. Joining the
body (decoder stack) and head (logits + loss) into a whole step for an
N-layer model is :meth:`StepProfile.phases`.

Costs: a body profile takes 6 dry runs of a 2-3 layer model (15 when
eager attention needs the ``s^2`` features and its own batch-1 fit), each
0.05-0.3 s on a 2-core CPU; a head profile 5-8 cheap ones. Both are cached
per model and settings for the life of the process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .probe import Timeline, body_run, head_run, probe_layer_types
from .spec import ModelSpec

log = logging.getLogger(__name__)

FEATURES = ("1", "b", "s", "b*s", "b*s*r", "r", "b*s^2", "s^2")
_BODY_MIN = (0, 2, 3, 4, 5)  # 1, s, b*s, b*s*r, r: enough unless attention builds s x s tensors
_HEAD_MIN = (0, 1, 2, 3)  # 1, b, s, b*s
_ALL = tuple(range(len(FEATURES)))
_CANDIDATES = tuple(
    (b, s, r) for s in (8, 16, 24, 40) for r in (1, 2, 3, 5) for b in (1, 2, 3, 4)
)  # small shapes: on meta the cost of a dry run does not depend on them


def features(b: int, s: int, r: int) -> list[int]:
    """The feature row for batch ``b``, sequence ``s``, rank ``r`` (order of :data:`FEATURES`)."""
    return [1, b, s, b * s, b * s * r, r, b * s * s, s * s]


class NotPolynomial(RuntimeError):
    """A dry run's sizes could not be fitted exactly (see the module docstring)."""


@dataclass
class _Group:
    b_min: int
    b_max: int | None
    coef: torch.Tensor  # (events, tags, features) float64, integer-valued
    markers: dict[str, int]


class Fitted:
    """Per-event, per-tag live bytes of one kind of dry run, for any shape."""

    def __init__(self, groups: list[_Group]):
        self.groups = groups

    def live(self, b: int, s: int, r: int) -> tuple[torch.Tensor, dict[str, int]]:
        """(events x tags float64 live bytes, markers) at shape (b, s, r)."""
        phi = torch.tensor(features(b, s, r), dtype=torch.float64)
        for g in self.groups:
            if b >= g.b_min and (g.b_max is None or b <= g.b_max):
                return g.coef @ phi, g.markers
        raise AssertionError(f"no fitted group covers batch {b}")


def _rows(points, cols) -> torch.Tensor:
    return torch.tensor([[features(*p)[c] for c in cols] for p in points], dtype=torch.float64)


def _candidates(b_min: int, b_max: int | None, uses_rank: bool) -> list[tuple[int, int, int]]:
    return [p for p in _CANDIDATES if p[0] >= b_min and (b_max is None or p[0] <= b_max) and (uses_rank or p[2] == 1)]


def _independent(cols: Sequence[int], cands) -> list[int]:
    """Drop features that coincide within the group (with b = 1, ``b*s`` is ``s``):
    a rank-deficient fit would split a coefficient between twins and no longer be integral."""
    keep: list[int] = []
    for c in cols:
        if int(torch.linalg.matrix_rank(_rows(cands, keep + [c]))) > len(keep):
            keep.append(c)
    return keep


def _choose_points(cols: Sequence[int], b_min: int, b_max: int | None, uses_rank: bool) -> list[tuple[int, int, int]]:
    """Points whose feature rows reach full column rank, plus one extra to check the fit."""
    cands = _candidates(b_min, b_max, uses_rank)
    rows = lambda pts: _rows(pts, cols)  # noqa: E731
    target = int(torch.linalg.matrix_rank(rows(cands)))
    chosen: list[tuple[int, int, int]] = []
    rank = 0
    for p in cands:
        if rank == target:
            break
        r = int(torch.linalg.matrix_rank(rows(chosen + [p])))
        if r > rank:
            chosen.append(p)
            rank = r
    extra = next(p for p in reversed(cands) if p not in chosen)
    return chosen + [extra]


def _fit_group(run: Callable, cols: Sequence[int], b_min: int, b_max: int | None, uses_rank: bool) -> _Group:
    cols = _independent(cols, _candidates(b_min, b_max, uses_rank))
    points = _choose_points(cols, b_min, b_max, uses_rank)
    timelines: list[Timeline] = [run(*p) for p in points]
    if len({t.live.shape[0] for t in timelines}) != 1 or any(t.markers != timelines[0].markers for t in timelines):
        raise NotPolynomial("the op sequence changes with the shape")
    phi = torch.tensor([[features(*p)[c] for c in cols] for p in points], dtype=torch.float64)
    y = torch.stack([t.live for t in timelines]).to(torch.float64)  # (points, events, tags)
    n, e, t = y.shape
    sol = torch.linalg.lstsq(phi, y.reshape(n, e * t), driver="gelsd").solution.round()
    if not torch.equal(phi @ sol, y.reshape(n, e * t)):
        raise NotPolynomial("live bytes are not an exact polynomial in the chosen features")
    coef = torch.zeros(e * t, len(FEATURES), dtype=torch.float64)
    coef[:, list(cols)] = sol.T
    return _Group(b_min, b_max, coef.reshape(e, t, len(FEATURES)), timelines[0].markers)


def fit(run: Callable, feature_sets: Sequence[Sequence[int]], uses_rank: bool) -> Fitted:
    """Fit ``run(b, s, r) -> Timeline`` exactly; see the module docstring for the fallbacks.

    Dry runs are memoized per shape, so a fallback reuses the runs it can.
    Whether ``b = 1`` needs its own fit is decided up front from two runs
    (an op that copies only when ``b > 1`` changes the number of events).

    Raises:
        NotPolynomial: no feature set reproduces the runs exactly.
    """
    memo: dict[tuple[int, int, int], Timeline] = {}

    def cached(b: int, s: int, r: int) -> Timeline:
        if (b, s, r) not in memo:
            memo[(b, s, r)] = run(b, s, r)
        return memo[(b, s, r)]

    probe_s = _CANDIDATES[0][1]
    split = cached(1, probe_s, 1).live.shape[0] != cached(2, probe_s, 1).live.shape[0]
    groups = ((1, 1), (2, None)) if split else ((1, None),)
    errors = []
    for cols in feature_sets:
        try:
            return Fitted([_fit_group(cached, cols, lo, hi, uses_rank) for lo, hi in groups])
        except NotPolynomial as e:
            errors.append(f"{[FEATURES[c] for c in cols]}: {e}")
    raise NotPolynomial("; ".join(errors))


# ---------------------------------------------------------------------------- joining a step


@dataclass
class Segment:
    """The worst moment of a stretch of a run, and its net effect, relative to its start (per tag)."""

    peak: torch.Tensor
    delta: torch.Tensor


def segment(live: torch.Tensor, start: int, end: int) -> Segment:
    """Segment of events ``start+1 .. end`` of ``live`` (events x tags)."""
    base = live[start] if start >= 0 else torch.zeros(live.shape[1], dtype=live.dtype)
    seg = live[start + 1 : end + 1]
    if seg.shape[0] == 0:
        zero = torch.zeros_like(base)
        return Segment(zero, zero)
    rel = seg - base
    return Segment(rel[int(rel.sum(1).argmax())], live[end] - base)


@dataclass
class PhasePeaks:
    """Per-tag live activation bytes (order of ``probe.TAGS``) at the worst moment of each phase.

    ``forward``: embeddings through the final norm; ``loss``: logits and
    loss, forward and backward; ``backward``: the decoder stack's backward
    (checkpoint recompute included); ``after``: what is left when backward
    ends (the LoRA gradients), the baseline of the optimizer step.
    """

    forward: torch.Tensor
    loss: torch.Tensor
    backward: torch.Tensor
    after: torch.Tensor


class StepProfile:
    """A fitted body (decoder stack) profile, joinable with any head."""

    def __init__(self, body: Fitted, probe_types: tuple[str, ...]):
        self.body = body
        self.probe_types = probe_types

    def phases(self, b: int, s: int, r: int, layer_types: Sequence[str], head: Segment) -> PhasePeaks:
        """Join the body at (b, s, r) with ``head`` for a model with ``len(layer_types)`` layers.

        Args:
            head: the loss's peak and net effect relative to the moment the
                stack's output exists; its delta must include the gradient it
                hands back (tag ``seed``).
        """
        live, m = self.body.live(b, s, r)
        n_probe = len(self.probe_types)
        f_end = [m[f"F{i + 1}"] for i in range(n_probe - 1)] + [m["E"]]
        pre = segment(live, -1, m["F0"])
        fwd = [segment(live, m[f"F{i}"], f_end[i]) for i in range(n_probe)]
        tail = segment(live, m["E"], m["H"])
        mid = segment(live, m["S"], m[f"B{n_probe - 1}"])
        b_end = [m["Z"]] + [m[f"B{i - 1}"] for i in range(1, n_probe)]
        bwd = [segment(live, m[f"B{i}"], b_end[i]) for i in range(n_probe)]
        rep = [0] + [1 + self.probe_types[1:].index(t) for t in layer_types[1:]]

        def worse(a, c):
            return c if a is None or c.sum() > a.sum() else a

        cur = pre.delta.clone()
        forward = pre.peak.clone()
        for k in range(len(layer_types)):
            forward = worse(forward, cur + fwd[rep[k]].peak)
            cur = cur + fwd[rep[k]].delta
        forward = worse(forward, cur + tail.peak)
        cur = cur + tail.delta
        loss = cur + head.peak
        cur = cur + head.delta
        backward = cur + mid.peak
        cur = cur + mid.delta
        for k in reversed(range(len(layer_types))):
            backward = worse(backward, cur + bwd[rep[k]].peak)
            cur = cur + bwd[rep[k]].delta
        return PhasePeaks(forward, loss, backward, cur)


@functools.lru_cache(maxsize=128)
def body_profile(
    spec: ModelSpec, targets: tuple[str, ...], dropout: float = 0.0, dora: bool = False,
    adapter_dtype: str = "bfloat16", attn: str = "sdpa", checkpointing: bool = True, device: str = "cuda",
    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, window: int | None = None,
) -> StepProfile:
    """The decoder stack's fitted profile (cached per model and settings).

    Raises:
        InputError: the model cannot be built with these settings.
        NotPolynomial: the stack's code branches on shapes in a way the fit cannot follow.
    """

    def run(b, s, r):
        return body_run(
            spec, b, s, r, targets, dropout, dora, adapter_dtype, attn, checkpointing, device,
            quant_type, blocksize, double_quant, window,
        )

    fitted = fit(run, (_BODY_MIN, _ALL), uses_rank=True)
    return StepProfile(fitted, probe_layer_types(spec))


@functools.lru_cache(maxsize=128)
def hf_head_profile(spec: ModelSpec, attn: str = "sdpa", device: str = "cuda") -> Fitted:
    """transformers' head + causal-LM loss, fitted (cached). Whole run = one segment."""
    return fit(lambda b, s, r: head_run(spec, b, s, attn, device), (_HEAD_MIN, _ALL), uses_rank=False)


def hf_head_segment(spec: ModelSpec, b: int, s: int, attn: str = "sdpa", device: str = "cuda") -> Segment:
    """Peak and net effect of transformers' head + loss at (b, s), per tag."""
    live, _ = hf_head_profile(spec, attn, device).live(b, s, 1)
    return segment(live, -1, live.shape[0] - 1)

