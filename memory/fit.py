"""Dry runs -> exact polynomials (needs torch): how a profile (:mod:`memory.profile`) is built.

Every tensor a step allocates has a size that is a product of the batch
``b``, the sequence length ``s``, the LoRA rank ``r`` and fixed model
dimensions (plus a few ``s + 1``-style sums, e.g. the padded labels). The
live bytes after each event of a dry run (:mod:`memory.probe`) are
therefore an exact polynomial with integer coefficients in the features
``1, b, s, b*s, b*s*r, r, b*s^2, s^2``, and with a tiled MLP ``t, t*r`` for
its tile of ``t`` tokens (:data:`memory.profile.FEATURES`).
:func:`fit` runs the probe at a handful of small shapes, solves for every
event's coefficients and requires the solution to reproduce one more shape
*exactly*. Batch 1 is fitted on its own when it runs different ops (a
``.contiguous()`` that copies only when ``b > 1``); a fit that does not
reproduce its check shape falls back to the full feature set (``s^2`` terms
come from eager attention and masks).

:func:`prune` then drops every event that can never be a peak: all features
are at least 1 for any real shape, so an event whose coefficients another
event of the same stretch matches or exceeds, term by term, is below it at
every shape. That keeps the stored profile small (89 of Llama-3.1-8B's
1,530 events) and its evaluation fast, and changes no answer (a test
compares pruned and unpruned profiles).

Costs: a body profile takes 6 dry runs of a 2-3 layer model (15 when eager
attention needs the ``s^2`` features and its own batch-1 fit), each 0.05-0.3
s on a 2-core CPU; a head profile 5-8 cheap ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .probe import Timeline, body_run, head_run, probe_layer_types
from .profile import FEATURES, features
from .spec import ModelSpec

BODY_MIN = (0, 2, 3, 4, 5, 8, 9)  # 1, s, b*s, b*s*r, r, t, t*r: enough unless attention builds s x s tensors
HEAD_MIN = (0, 1, 2, 3)  # 1, b, s, b*s
ALL = tuple(range(len(FEATURES)))
# Small shapes (on meta the cost of a dry run does not depend on them). Sequences are multiples of 32:
# CUDA's memory-efficient attention (sdpa with a mask: sliding windows) pads its log-sum-exp to one,
# which no polynomial in s follows; the planner's error at other lengths is < 32*b*heads*4 bytes.
# Tiles: two of them must fit in the shortest probe (b*s = 32): a tiled dry run runs two (layers.tiling).
_CANDIDATES = tuple(
    (b, s, r) for s in (32, 64, 96, 160) for r in (1, 2, 3, 5) for b in (1, 2, 3, 4)
)
_TILES = (4, 8, 16)


class NotPolynomial(RuntimeError):
    """A dry run's sizes could not be fitted exactly (see the module docstring)."""


def _rows(points, cols) -> torch.Tensor:
    return torch.tensor([[features(*p)[c] for c in cols] for p in points], dtype=torch.float64)


Point = tuple[int, int, int, int]  # (b, s, r, t)


def _candidates(b_min: int, b_max: int | None, uses_rank: bool, tiled: bool = False) -> list[Point]:
    return [
        (b, s, r, t) for b, s, r in _CANDIDATES for t in (_TILES if tiled else (0,))
        if b >= b_min and (b_max is None or b <= b_max) and (uses_rank or r == 1)
    ]


def _independent(cols: Sequence[int], cands) -> list[int]:
    """Drop features that coincide within the group (with b = 1, ``b*s`` is ``s``):
    a rank-deficient fit would split a coefficient between twins and no longer be integral."""
    keep: list[int] = []
    for c in cols:
        if int(torch.linalg.matrix_rank(_rows(cands, keep + [c]))) > len(keep):
            keep.append(c)
    return keep


def _choose_points(cols: Sequence[int], cands: list[Point]) -> list[Point]:
    """Points whose feature rows reach full column rank, plus one extra to check the fit."""
    target = int(torch.linalg.matrix_rank(_rows(cands, cols)))
    chosen: list[Point] = []
    rank = 0
    for p in cands:
        if rank == target:
            break
        r = int(torch.linalg.matrix_rank(_rows(chosen + [p], cols)))
        if r > rank:
            chosen.append(p)
            rank = r
    extra = next(p for p in reversed(cands) if p not in chosen)
    return chosen + [extra]


def _fit_group(run: Callable, cols: Sequence[int], b_min: int, b_max: int | None, uses_rank: bool,
               tiled: bool) -> dict:
    cands = _candidates(b_min, b_max, uses_rank, tiled)
    cols = _independent(cols, cands)  # untiled: t and t*r are 0 and drop out here
    points = _choose_points(cols, cands)
    timelines: list[Timeline] = [run(*p) for p in points]
    if len({t.live.shape[0] for t in timelines}) != 1 or any(t.markers != timelines[0].markers for t in timelines):
        raise NotPolynomial("the op sequence changes with the shape")
    phi = _rows(points, cols)
    y = torch.stack([t.live for t in timelines]).to(torch.float64)  # (points, events, tags)
    n, e, t = y.shape
    sol = torch.linalg.lstsq(phi, y.reshape(n, e * t), driver="gelsd").solution.round()
    if not torch.equal(phi @ sol, y.reshape(n, e * t)):
        raise NotPolynomial("live bytes are not an exact polynomial in the chosen features")
    coef = torch.zeros(e * t, len(FEATURES), dtype=torch.float64)
    coef[:, list(cols)] = sol.T
    return {"b_min": b_min, "b_max": b_max, "markers": dict(timelines[0].markers),
            "coef": coef.reshape(e, t, len(FEATURES)).to(torch.int64).tolist()}


def fit(run: Callable, feature_sets: Sequence[Sequence[int]], uses_rank: bool, tiled: bool = False) -> list[dict]:
    """Fit ``run(b, s, r, t) -> Timeline`` exactly; see the module docstring for the fallbacks.

    ``tiled``: the run has MLP tiles of ``t`` tokens, varied over the dry runs (else ``t`` is 0).

    Dry runs are memoized per shape, so a fallback reuses the runs it can.
    Whether ``b = 1`` needs its own fit is decided up front from two runs
    (an op that copies only when ``b > 1`` changes the number of events).

    Returns:
        One group per batch range: ``{"b_min", "b_max", "markers", "coef"}`` with
        ``coef`` an (events x tags x features) nested list of ints
        (:class:`memory.profile.Fitted` reads it).

    Raises:
        NotPolynomial: no feature set reproduces the runs exactly.
    """
    memo: dict[Point, Timeline] = {}

    def cached(*point: int) -> Timeline:
        if point not in memo:
            memo[point] = run(*point)
        return memo[point]

    probe_s, probe_t = _CANDIDATES[0][1], _TILES[0] if tiled else 0
    split = cached(1, probe_s, 1, probe_t).live.shape[0] != cached(2, probe_s, 1, probe_t).live.shape[0]
    ranges = ((1, 1), (2, None)) if split else ((1, None),)
    errors = []
    for cols in feature_sets:
        try:
            return [_fit_group(cached, cols, lo, hi, uses_rank, tiled) for lo, hi in ranges]
        except NotPolynomial as e:
            errors.append(f"{[FEATURES[c] for c in cols]}: {e}")
    raise NotPolynomial("; ".join(errors))


def prune(group: dict) -> dict:
    """``group`` without the events that can never be a segment's peak (see the module docstring).

    Marker events and the last event are kept (segments start and end there)
    and markers are re-indexed. Between two kept boundaries, an event goes
    when another event there has coefficient sums (over tags) at least as
    large in every feature, and larger in one, or equal and earlier (the
    peak is the first maximum).
    """
    coef = torch.tensor(group["coef"], dtype=torch.int64)  # (events, tags, features)
    n = coef.shape[0]
    if n == 0:
        return group
    total = coef.sum(1)  # (events, features)
    bounds = sorted({m for m in group["markers"].values() if m >= 0} | {n - 1})
    keep = torch.zeros(n, dtype=torch.bool)
    keep[bounds] = True
    lo = -1
    for hi in bounds:
        idx = torch.arange(lo + 1, hi + 1)
        c = total[idx]  # (m, features)
        ge = (c[:, None, :] >= c[None, :, :]).all(-1)  # ge[j, i]: event j is >= event i in every feature
        strict = (c[:, None, :] != c[None, :, :]).any(-1)
        earlier = idx[:, None] < idx[None, :]
        dominated = (ge & (strict | earlier)).any(0)
        keep[idx[~dominated]] = True
        lo = hi
    kept = torch.nonzero(keep).flatten().tolist()
    position = {old: new for new, old in enumerate(kept)}
    markers = {k: (position[v] if v >= 0 else -1) for k, v in group["markers"].items()}
    return dict(group, markers=markers, coef=coef[kept].tolist())


def fit_body(
    spec: ModelSpec, targets: tuple[str, ...], dropout: float, dora: bool, adapter_dtype: str, attn: str,
    checkpointing: bool, device: str, quant_type: str, blocksize: int, double_quant: bool, window: int | None,
    tiled_mlp: bool = False, tiled_norms: bool = False, vera: bool = False, adalora: bool = False,
) -> dict:
    """The decoder stack's profile as stored (:class:`memory.profile.StepProfile` reads it).

    Raises:
        InputError: the model cannot be built with these settings.
        NotPolynomial: the stack's code branches on shapes in a way the fit cannot follow.
    """

    def run(b, s, r, t):
        return body_run(
            spec, b, s, r, targets, dropout, dora, adapter_dtype, attn, checkpointing, device,
            quant_type, blocksize, double_quant, window,
            mlp_tile_tokens=(t or None) if tiled_mlp else None, norm_tile_tokens=(t or None) if tiled_norms else None,
            vera=vera, adalora=adalora,
        )

    # one tile size for both (Settings.tile_tokens): the profile keeps one tile variable t
    groups = fit(run, (BODY_MIN, ALL), uses_rank=True, tiled=tiled_mlp or tiled_norms)
    return {"probe_types": list(probe_layer_types(spec)), "groups": [prune(g) for g in groups]}


def fit_head(spec: ModelSpec, attn: str, device: str) -> dict:
    """transformers' head + causal-LM loss, as stored (one segment: the whole run)."""
    groups = fit(lambda b, s, r, t: head_run(spec, b, s, attn, device), (HEAD_MIN, ALL), uses_rank=False)
    return {"groups": [prune(g) for g in groups]}
