"""Fitted activation profiles, evaluated in pure Python: live bytes at any (batch, seq, rank).

A profile is what :mod:`memory.fit` learns from meta-device dry runs
(:mod:`memory.probe`): for every allocation event of a step, its live bytes
per tag as an exact integer polynomial in the features :data:`FEATURES`.
Evaluating one at a shape is a few hundred small dot products, so the
planner can search hundreds of configurations in milliseconds, and it needs
neither torch nor the dry runs once the profile is stored
(:mod:`memory.cache`: shipped for the catalog's default settings, else
cached on disk the first time). Joining the body (decoder stack) and head
(logits + loss) into a whole step for an N-layer model is
:meth:`StepProfile.phases`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .cache import cached
from .spec import ModelSpec

log = logging.getLogger(__name__)

# t: tokens per MLP tile (layers.tiling), 0 for an untiled MLP; its intermediates exist one tile at a time
FEATURES = ("1", "b", "s", "b*s", "b*s*r", "r", "b*s^2", "s^2", "t", "t*r")
# Tags: what a live storage was allocated for. "seed" is the gradient that
# flows backward between the head and the layers; "grad" are LoRA parameter
# gradients; "dequant" the dense weights the 4-bit layers rebuild.
TAGS = ("inputs", "pre", "fwd", "head", "seed", "bwd", "dequant", "grad")
Vec = list[int]  # bytes per tag, in the order of TAGS


PROBE_WINDOW = 4  # below every probe sequence length (memory.fit uses 32 to 160)
MAX_PROBE_SEQ = 160  # the longest probe sequence (memory.fit._CANDIDATES; a test checks they agree)
_NO_WINDOW = 1 << 20  # longer than every probe sequence


def probe_window(spec: ModelSpec, seq_len: int) -> int | None:
    """The sliding window a dry run for ``seq_len`` uses: None (the config's) or :data:`PROBE_WINDOW`.

    transformers (``masking_utils``) builds a sliding-window layer's mask for
    sdpa only when the sequence reaches the window (``kv_length >=
    sliding_window``: at or past it; below it the mask is the causal one and
    sdpa runs with ``is_causal``). The mask is a ``1 x 1 x s x s`` bool tensor
    (expanded to ``b x 1 x s x s``); sdpa then turns it into an additive
    ``b x 1 x s x s`` mask in the query's dtype, which the attention kernel
    keeps for backward, and repeats grouped k/v for every query head. Its
    size does not depend on the window, only on whether it exists. Eager
    attention builds a ``b x 1 x s x s`` float mask in the model dtype for
    every layer type at any length, so the window changes nothing there.

    Dry runs use short sequences (32-160 tokens), always inside a real window
    (512-4096), so a plan for ``seq_len >= window`` is fitted from dry runs with
    a window shorter than every probe sequence. The window is the one the
    model uses (:attr:`ModelSpec.sliding_window`, read from the transformers
    config by :mod:`memory.meta`: the class default when config.json omits it,
    None when no layer slides).
    """
    window = spec.sliding_window  # memory.meta reads it from the transformers config
    if window is None:
        return None
    if seq_len >= window:
        return PROBE_WINDOW
    # inside a window no longer than the probe sequences (tiny test models): some dry runs would cross
    # it, so they run with one longer than all of them (real windows, 512 and up, keep the config's)
    return None if window > MAX_PROBE_SEQ else _NO_WINDOW


def _rng_untouched():
    """Dry runs must not move torch's random stream: a trainer's data order and init would then
    depend on whether its plan was cached."""
    import torch

    return torch.random.fork_rng(devices=[])


def features(b: int, s: int, r: int, t: int = 0) -> list[int]:
    """The feature row for batch ``b``, sequence ``s``, rank ``r``, MLP tile ``t`` (order of :data:`FEATURES`)."""
    return [1, b, s, b * s, b * s * r, r, b * s * s, s * s, t, t * r]


def _dot(row: Sequence[int], phi: Sequence[int]) -> int:
    return sum(c * p for c, p in zip(row, phi) if c)


class Fitted:
    """Per-event, per-tag live bytes of one kind of dry run, for any shape.

    Built from :func:`memory.fit.fit`'s groups (one per batch range), each
    with ``coef``: events x tags x features integer coefficients.
    """

    def __init__(self, groups: list[dict]):
        self.groups = [
            (g["b_min"], g["b_max"], g["markers"], g["coef"], [[sum(col) for col in zip(*ev)] for ev in g["coef"]])
            for g in groups
        ]

    def at(self, b: int, s: int, r: int, t: int = 0) -> _Live:
        """The run at shape (b, s, r) with MLP tiles of ``t`` tokens (0: untiled)."""
        phi = features(b, s, r, t)
        for b_min, b_max, markers, coef, totals in self.groups:
            if b >= b_min and (b_max is None or b <= b_max):
                return _Live(phi, markers, coef, [_dot(t, phi) for t in totals])
        raise AssertionError(f"no fitted group covers batch {b}")


@dataclass
class Segment:
    """The worst moment of a stretch of a run, and its net effect, relative to its start (per tag)."""

    peak: Vec
    delta: Vec


class _Live:
    """A fitted run at one shape: total bytes after each event; per-tag bytes on demand."""

    def __init__(self, phi: list[int], markers: dict[str, int], coef: list, totals: list[int]):
        self.phi, self.markers, self.coef, self.totals = phi, markers, coef, totals

    @property
    def last(self) -> int:
        return len(self.totals) - 1

    def tags(self, event: int) -> Vec:
        if event < 0:
            return [0] * len(TAGS)
        return [_dot(row, self.phi) for row in self.coef[event]]

    def segment(self, start: int, end: int) -> Segment:
        """Segment of events ``start+1 .. end``: the first moment of largest total, and the net change."""
        if end <= start:
            zero = [0] * len(TAGS)
            return Segment(zero, list(zero))
        window = self.totals[start + 1 : end + 1]
        worst = start + 1 + window.index(max(window))
        base = self.tags(start)
        return Segment(_sub(self.tags(worst), base), _sub(self.tags(end), base))


def _add(a: Vec, b: Vec) -> Vec:
    return [x + y for x, y in zip(a, b)]


def _sub(a: Vec, b: Vec) -> Vec:
    return [x - y for x, y in zip(a, b)]


# ---------------------------------------------------------------------------- joining a step


@dataclass
class PhasePeaks:
    """Per-tag live activation bytes (order of :data:`TAGS`) at the worst moment of each phase.

    ``forward``: embeddings through the final norm; ``loss``: logits and
    loss, forward and backward; ``backward``: the decoder stack's backward
    (checkpoint recompute included); ``after``: what is left when backward
    ends (the LoRA gradients), the baseline of the optimizer step.
    """

    forward: Vec
    loss: Vec
    backward: Vec
    after: Vec


class StepProfile:
    """A fitted body (decoder stack) profile, joinable with any head.

    Args:
        body: the decoder stack's :class:`Fitted` run.
        probe_types: the layer types of the probe stack (``memory.probe.probe_layer_types``).
    """

    def __init__(self, body: Fitted, probe_types: tuple[str, ...]):
        self.body = body
        self.probe_types = probe_types

    def phases(self, b: int, s: int, r: int, layer_types: Sequence[str], head: Segment, t: int = 0) -> PhasePeaks:
        """Join the body at (b, s, r) with ``head`` for a model with ``len(layer_types)`` layers.

        Args:
            t: tokens per MLP tile for a tiled profile (:func:`body_profile` with ``tiled_mlp``);
                at most ``b * s`` (one tile).
            head: the loss's peak and net effect relative to the moment the
                stack's output exists; its delta must include the gradient it
                hands back (tag ``seed``).
        """
        live = self.body.at(b, s, r, t)
        m = live.markers
        n_probe = len(self.probe_types)
        f_end = [m[f"F{i + 1}"] for i in range(n_probe - 1)] + [m["E"]]
        pre = live.segment(-1, m["F0"])
        fwd = [live.segment(m[f"F{i}"], f_end[i]) for i in range(n_probe)]
        tail = live.segment(m["E"], m["H"])
        mid = live.segment(m["S"], m[f"B{n_probe - 1}"])
        b_end = [m["Z"]] + [m[f"B{i - 1}"] for i in range(1, n_probe)]
        bwd = [live.segment(m[f"B{i}"], b_end[i]) for i in range(n_probe)]
        rep = [0] + [1 + self.probe_types[1:].index(t) for t in layer_types[1:]]

        def worse(a: Vec, c: Vec) -> Vec:
            return c if sum(c) > sum(a) else a

        cur = list(pre.delta)
        forward = list(pre.peak)
        for k in range(len(layer_types)):
            forward = worse(forward, _add(cur, fwd[rep[k]].peak))
            cur = _add(cur, fwd[rep[k]].delta)
        forward = worse(forward, _add(cur, tail.peak))
        cur = _add(cur, tail.delta)
        loss = _add(cur, head.peak)
        cur = _add(cur, head.delta)
        backward = _add(cur, mid.peak)
        cur = _add(cur, mid.delta)
        for k in reversed(range(len(layer_types))):
            backward = worse(backward, _add(cur, bwd[rep[k]].peak))
            cur = _add(cur, bwd[rep[k]].delta)
        return PhasePeaks(forward, loss, backward, cur)


@functools.lru_cache(maxsize=128)
def body_profile(
    spec: ModelSpec, targets: tuple[str, ...], dropout: float = 0.0, dora: bool = False,
    adapter_dtype: str = "bfloat16", attn: str = "sdpa", checkpointing: bool = True, device: str = "cuda",
    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, window: int | None = None,
    tiled_mlp: bool = False, tiled_norms: bool = False, vera: bool = False, adalora: bool = False,
) -> StepProfile:
    """The decoder stack's profile: shipped, cached on disk, or fitted now (:func:`memory.fit.fit_body`).

    ``window`` is the sliding window the dry runs use instead of the config's
    (:func:`probe_window`). ``tiled_mlp``, ``tiled_norms``: every layer's MLP,
    every norm runs in tiles (:mod:`layers.tiling`); the profile is then read
    at a tile size ``t`` (one size for both).

    Raises:
        InputError: the model cannot be built with these settings.
        NotPolynomial: the stack's code branches on shapes in a way the fit cannot follow.
    """
    args = (targets, dropout, dora, adapter_dtype, attn, checkpointing, device, quant_type, blocksize, double_quant,
            window, tiled_mlp, tiled_norms, vera, adalora)

    def build() -> dict:
        from .fit import fit_body  # torch + the dry runs: only when no cache has this profile

        log.info("fitting the activation profile of %s (%s); it is cached afterwards", spec.name, attn)
        with _rng_untouched():
            return fit_body(spec, *args)

    names = ("targets", "dropout", "dora", "adapter_dtype", "attn", "checkpointing", "device", "quant_type",
             "blocksize", "double_quant", "window", "tiled_mlp", "tiled_norms", "vera", "adalora")
    parts = {"model": spec.config_json, "run": "body", **dict(zip(names, args))}
    for variant in ("vera", "adalora"):  # the keys profiles had before these: LoRA and DoRA keys stay as they were
        if not parts[variant]:
            del parts[variant]
    parts["targets"] = list(targets)
    data = cached("profile", parts, build)
    return StepProfile(Fitted(data["groups"]), tuple(data["probe_types"]))


@functools.lru_cache(maxsize=128)
def hf_head_profile(spec: ModelSpec, attn: str = "sdpa", device: str = "cuda") -> Fitted:
    """transformers' head + causal-LM loss (shipped, cached or fitted, as :func:`body_profile`)."""

    def build() -> dict:
        from .fit import fit_head

        with _rng_untouched():
            return fit_head(spec, attn, device)

    parts = {"model": spec.config_json, "run": "head", "attn": attn, "device": device}
    return Fitted(cached("profile", parts, build)["groups"])


def hf_head_segment(spec: ModelSpec, b: int, s: int, attn: str = "sdpa", device: str = "cuda") -> Segment:
    """Peak and net effect of transformers' head + loss at (b, s), per tag."""
    live = hf_head_profile(spec, attn, device).at(b, s, 1)
    return live.segment(-1, live.last)
