"""Peak bytes of live tensors, measured by watching every storage torch creates.

On CUDA, ``torch.cuda.max_memory_allocated`` answers "how much memory did
tensors hold at the worst moment"; the CPU allocator has no such counter.
:class:`LiveTensorTracker` provides it on any device, meta included: a
``TorchDispatchMode`` sees the outputs of every aten op (forward, backward
and optimizer alike), keys each output by its *storage* (views and in-place
results share one, so nothing is counted twice) and adds the storage's bytes;
a weakref callback on the storage subtracts them when the storage is really
freed. Storage Python objects are preserved while any C++ reference (an
autograd graph's saved tensor, for example) keeps the memory alive, so the
callback fires at the true free, not when the last Python name goes away.

Only storages an op *creates* count: returns that alias an input (views,
in-place and ``out=`` ops, per the op's schema) allocate nothing, and are
only checked for in-place resizes. So a view of a parameter made during the
step does not count the parameter.

What it does not see: memory allocated inside a kernel without a tensor
(oneDNN scratch, the CUDA context) and tensors created before it started,
unless they are registered with :meth:`LiveTensorTracker.track`.

The tracker optionally records a timeline (one entry per allocation or
free) with a *tag* per storage, so callers can attribute the peak to parts
of a computation (``with tracker.tagged("logits"): ...``).

Overhead: one Python call per aten op (roughly 10-30 us), so it is a
measurement tool, not something to leave on during training.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Event(NamedTuple):
    """One change of the live set: ``nbytes`` > 0 is an allocation, < 0 a free.

    A named tuple rather than a dataclass: dry runs record thousands of them.
    """

    key: int
    nbytes: int
    tag: str
    marker: str | None = None  # set on zero-byte marker events only


class LiveTensorTracker(TorchDispatchMode):
    """Track live tensor bytes on one device type and remember the peak.

    Args:
        device_type: ``'cpu'``, ``'cuda'``, ``'meta'``...; tensors on other
            devices are ignored.
        record: keep the full event list in :attr:`events` (for timelines
            and attribution; costs memory proportional to the op count).

    Attributes:
        current: bytes of the storages currently alive.
        peak: the largest ``current`` seen since the last :meth:`reset_peak`.

    Use as a context manager around the code to measure::

        with LiveTensorTracker("cpu") as t:
            t.track(model.parameters())
            step()
        t.peak
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps every mode's __torch_dispatch__ in a dynamo "disable"
        # guard by default; nothing is ever compiled inside this tracker, and
        # the guard costs a torch._dynamo import (~2 s) plus a wrapper call per op.
        return False

    def __init__(self, device_type: str = "cpu", record: bool = False):
        super().__init__()
        self.device_type = device_type
        self.record = record
        self.current = 0
        self.peak = 0
        self.events: list[Event] = []
        self._live: dict[int, tuple[weakref.ref, int, str]] = {}
        self.tag = "other"  # tag given to storages first seen from now on

    # -- registration --------------------------------------------------

    def track(self, tensors: Iterable[torch.Tensor | None], tag: str | None = None) -> None:
        """Count tensors that already exist (parameters, optimizer state...)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t, tag)

    def _add(self, t: torch.Tensor, tag: str | None = None) -> None:
        if t.device.type != self.device_type:
            return
        # Wrapper subclasses without storage (e.g. some functional tensors) are skipped.
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        nbytes = st.nbytes()
        if key in self._live:
            return
        if nbytes == 0:
            return
        tag = tag or self.tag
        ref = weakref.ref(st, lambda _r, k=key: self._free(k))
        self._live[key] = (ref, nbytes, tag)
        self._change(key, nbytes, tag)

    def note_resize(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage at its size now, after a resize the dispatcher did not see.

        ``UntypedStorage.resize_`` bypasses ``__torch_dispatch__``; FSDP2 frees
        and re-allocates its gathered parameters that way. Callers that watch
        such code report each resize here (a storage not seen before is
        counted as new).
        """
        if t.device.type != self.device_type:
            return
        if t.untyped_storage()._cdata in self._live:
            self._resized(t)
        else:
            self._add(t)

    def _resized(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        known = self._live.get(st._cdata)
        if known is not None and known[1] != st.nbytes():
            self._change(st._cdata, st.nbytes() - known[1], known[2])
            self._live[st._cdata] = (known[0], st.nbytes(), known[2])

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._change(key, -entry[1], entry[2])

    def _change(self, key: int, nbytes: int, tag: str) -> None:
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        if self.record:
            self.events.append(Event(key, nbytes, tag))

    # -- tags, markers, peaks ---------------------------------------------

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Storages first seen inside this block get ``tag``."""
        old, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = old

    def mark(self, name: str) -> None:
        """Insert a zero-byte marker event (a phase boundary) into the timeline."""
        if self.record:
            self.events.append(Event(0, 0, "", name))

    def retag(self, t: torch.Tensor, tag: str) -> None:
        """Move ``t``'s storage (if counted) to ``tag`` from now on; recorded as a free + allocation."""
        key = storage_key(t)
        entry = self._live.get(key)
        if entry is None or entry[2] == tag:
            return
        ref, n, old = entry
        self._live[key] = (ref, n, tag)
        if self.record:
            self.events.append(Event(key, -n, old))
            self.events.append(Event(key, n, tag))

    def release(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as freed now, although a reference still holds it.

        For simulations: a dry run that must keep a tensor alive for
        bookkeeping (e.g. as the root of ``backward``) while the real step
        would already have dropped it.
        """
        self._free(storage_key(t))

    def forget(self) -> None:
        """Start over: stop counting every storage alive now (and their frees) and drop the recorded events."""
        self._live.clear()
        self.events.clear()
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        """Start a new peak window at the current live bytes."""
        self.peak = self.current

    def live_keys(self) -> set[int]:
        """Storage keys alive now (``untyped_storage()._cdata``)."""
        return set(self._live)

    def bytes_by_tag(self) -> dict[str, int]:
        """Live bytes now, grouped by tag."""
        out: dict[str, int] = {}
        for _ref, n, tag in self._live.values():
            out[tag] = out.get(tag, 0) + n
        return out

    # -- the dispatch hook -------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if len(returns) > 1 else (out,)
        for ret, value in zip(returns, outs):
            # A return with an alias annotation (views, in-place and out= ops)
            # shares an input's storage: it allocates nothing, and the input
            # may predate the tracker (a parameter), so it must not be counted
            # as new. Such storages are only checked for in-place resizes.
            fresh = ret.alias_info is None
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    if fresh:
                        self._add(t)
                    else:
                        self._resized(t)
        return out


def storage_key(t: torch.Tensor) -> int:
    """The identity the tracker uses for ``t``'s memory (shared by all views)."""
    return t.untyped_storage()._cdata
