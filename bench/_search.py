"""The max-context search of bench/train.py: longest length a (monotone) probe accepts, in few probes.

Each probe at 8B scale and 64k tokens costs a training step of half a
minute or more, and device time is short, so the search uses what the
fitting probes measured: memory grows about linearly with sequence length
under SDPA and checkpointing, so two fitting probes predict where the cap is
reached. The prediction places the next probe (strictly inside the current
bracket); plain doubling and bisection take over after two predicted probes,
so a bad model cannot make the search creep.
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
                   predict: Callable[[], float | None] | None = None,
                   predicted_probes: int = 2) -> tuple[int, int | None]:
    """The longest length ``fits`` accepts: double from ``start``, then narrow the bracket to ``resolution``.

    With ``predict``, up to ``predicted_probes`` probes are placed by it
    instead: while doubling, a predicted limit below the next doubling is
    bracketed by probing one step above it (a failing probe there saves the
    far larger failure at twice the length); while narrowing, the probe goes
    to the predicted limit instead of the middle. Either way every probe lies
    strictly inside the current bracket, so the answer is the one plain
    doubling and bisection would give.

    Args:
        fits: runs one probe; assumed monotone (true up to some length, false beyond).
        start, max_seq: the doubling starts at ``start`` and stops past ``max_seq``.
        resolution: the answer is a multiple of it (``start`` should be too).
        predict: optional guess of the longest fitting length from what the probes so far measured.

    Returns:
        (longest length that fit, 0 if none; shortest that failed, None if
        every length up to ``max_seq`` fit).
    """
    lo, hi, guesses = 0, None, 0

    def guess() -> int | None:
        if predict is None or guesses >= predicted_probes or lo == 0:
            return None
        g = predict()
        return None if g is None else _round_down(g, resolution)

    seq: int | None = start if start <= max_seq else None
    while seq is not None:
        if fits(seq):
            lo = seq
        else:
            hi = seq
        if hi is None:  # still doubling
            seq = 2 * lo
            g = guess()
            if g is not None and lo <= g < seq:
                guesses += 1
                seq = g + resolution if g > lo else lo + resolution
            seq = seq if seq <= max_seq else None
        elif hi - lo <= resolution:
            seq = None
        else:
            mid = (lo + hi) // 2 // resolution * resolution
            g = guess()
            if g is not None:
                guesses += 1
                mid = min(max(g, lo + resolution), hi - resolution)
            seq = mid if lo < mid < hi else None
    return lo, hi
