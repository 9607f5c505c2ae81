"""The max-context search of bench/train.py: longest length a (monotone) probe accepts, in few probes.

Each probe at 8B scale and 64k tokens costs a training step of half a
minute or more, and device time is short, so the search uses what the
fitting probes measured: memory grows about linearly with sequence length
under SDPA and checkpointing, so two fitting probes predict where the cap is
reached. The prediction picks the next probe (clamped strictly inside the
bracket); plain bisection takes over after two predicted probes, so a bad
model cannot make the search creep.
"""

from __future__ import annotations

from collections.abc import Callable


def _round_down(x: float, step: int) -> int:
    return int(x) // step * step


def linear_prediction(points: list[tuple[int, int]], cap: int) -> float | None:
    """Length at which a line through the last two (length, peak bytes) points reaches ``cap``; None if undefined."""
    if len(points) < 2:
        return None
    (s1, p1), (s2, p2) = sorted(points)[-2:]
    if s2 == s1 or p2 <= p1:
        return None
    return s2 + (cap - p2) * (s2 - s1) / (p2 - p1)


def search_longest(fits: Callable[[int], bool], start: int, max_seq: int, resolution: int,
                   predict: Callable[[], float | None] | None = None, predicted_probes: int = 2) -> tuple[int, int | None]:
    """The longest length ``fits`` accepts: double from ``start``, then narrow the bracket to ``resolution``.

    Args:
        fits: runs one probe; assumed monotone (true up to some length, false beyond).
        start, max_seq: the doubling starts at ``start`` and stops past ``max_seq``.
        resolution: the answer is a multiple of it (``start`` should be too).
        predict: optional guess of the longest fitting length from what the
            probes so far measured; used for the first ``predicted_probes``
            probes after the doubling, then bisection.

    Returns:
        (longest length that fit, 0 if none; shortest that failed, None if
        every length up to ``max_seq`` fit).
    """
    lo, hi, seq = 0, None, start
    while seq <= max_seq:
        if not fits(seq):
            hi = seq
            break
        lo, seq = seq, seq * 2
    guesses = 0
    while hi is not None and hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        guess = predict() if predict is not None and guesses < predicted_probes else None
        if guess is not None:
            guesses += 1
            mid = min(max(_round_down(guess, resolution), lo + resolution), hi - resolution)
        if mid <= lo:  # the bracket is narrower than one step of the grid
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi
