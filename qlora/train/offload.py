"""Offloaded gradient checkpointing: checkpointed layer inputs wait in pinned host memory.

With one non-reentrant checkpoint per decoder layer, the only activations
kept across the forward pass are the layers' *inputs*: one
``(batch, seq, hidden)`` hidden state per layer, ``2*b*s*h`` bytes in bf16
(0.5 GiB for Llama-3-8B at 2,048 tokens, 16 GiB at 64k). Everything a layer
saves while it runs is dropped and recomputed in backward.

Where the hooks sit: ``torch.utils.checkpoint`` (non-reentrant) stores the
checkpointed function's tensor arguments as autograd ``SavedTensor``\\ s
*before* it installs its own saved-tensor hooks, and everything saved
inside the layer, in the forward and in the recompute, goes through the
checkpoint's inner hooks, which take precedence over outer ones. So a
``saved_tensors_hooks`` pair entered *around* the checkpoint call sees
exactly the layer inputs and nothing else. :func:`offload_checkpointed_inputs`
puts that pair around the checkpoint function transformers' decoder layers
call (``GradientCheckpointingLayer._gradient_checkpointing_func``).

On CUDA, :class:`ActivationOffloader`:

* pack (forward): copies the input into pinned host memory on a side stream
  that first waits for the compute stream (so the copy reads finished
  values). ``record_stream`` marks the device tensor as in use by the side
  stream, so the caching allocator cannot hand its memory to a later
  compute-stream allocation before the copy has read it. The device copy
  is freed as soon as the layer returns.
* unpack (backward): hands back the input on its device. When layer ``i``'s
  input is unpacked, the copy of layer ``i-1``'s input (the next one
  backward needs) starts on the side stream, overlapping layer ``i``'s
  recompute and backward. The consumer's stream waits on that copy's event
  before using it.

Costs: device memory drops by the checkpointed inputs minus two layers'
worth (the one being recomputed and the one being prefetched); pinned host
memory grows by all of them (``layers * 2*b*s*h`` bytes); each step moves
that many bytes over PCIe twice, hidden behind compute when the link keeps
up (a layer's compute takes longer than copying its input at ~20 GB/s),
exposed otherwise.

On the CPU there is nothing to move: pack keeps the tensor itself (a no-op,
no copy). ``copy_on_cpu=True`` copies it anyway, which runs the same
pack / prefetch / unpack bookkeeping on a machine without a GPU, so tests
can check that every layer gets its own input back.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quant.errors import InputError

log = logging.getLogger(__name__)

_MARK = "_qlora_offloader"  # attribute set on the wrapped checkpoint function


@dataclass
class OffloadStats:
    """Counters since the offloader was made (tests and logs read them).

    Attributes:
        packed: tensors handed to the pack hook (checkpointed layer inputs).
        offloaded: of those, copied to host memory.
        offloaded_bytes: bytes copied to host memory.
        kept: of those, left where they were (CPU tensors without
            ``copy_on_cpu``, parameters, non-CUDA accelerators).
        unpacked: tensors handed back to backward.
        prefetched: unpacks served by a copy started at the previous unpack.
    """

    packed: int = 0
    offloaded: int = 0
    offloaded_bytes: int = 0
    kept: int = 0
    unpacked: int = 0
    prefetched: int = 0


class _Packed:
    """One checkpointed input: either kept as is, or a host copy plus copy-back state."""

    __slots__ = ("kept", "host", "device", "d2h", "ready", "h2d", "ready_stream", "prev", "unpacks", "__weakref__")

    def __init__(self, kept: torch.Tensor | None = None, device: torch.device | None = None):
        self.kept = kept  # the tensor itself (no move)
        self.host: torch.Tensor | None = None  # host copy (pinned on CUDA)
        self.device = device  # where unpack must return it
        self.d2h = None  # CUDA event: the host copy is complete
        self.ready: torch.Tensor | None = None  # a device copy made ahead of unpack (prefetch)
        self.h2d = None  # CUDA event: ``ready`` is complete
        self.ready_stream = None  # the stream ``ready`` was allocated on
        self.prev: weakref.ref | None = None  # the input packed just before this one (backward needs it next)
        self.unpacks = 0


class ActivationOffloader:
    """Saved-tensor hooks that move checkpointed layer inputs to host memory and back.

    Use :meth:`wrap` on a checkpoint function (or :func:`offload_checkpointed_inputs`
    on a model). Only tensors saved *directly* under the hooks are seen:
    around a checkpoint call, the checkpointed function's tensor arguments.

    Args:
        prefetch: on unpack, start copying the previously packed input back
            (backward visits layers in reverse). Costs one extra layer input
            of device memory while it waits; off: each copy-back runs on the
            compute stream when needed, unoverlapped.
        copy_on_cpu: copy CPU tensors too (to a separate host tensor), so the
            offload path runs without a GPU; costs one copy per layer. Default
            off: on the CPU the move is a no-op.
        on_pack: called with every tensor the pack hook receives, before it
            is moved (a test hook: which tensors are routed here).
    """

    def __init__(
        self, prefetch: bool = True, copy_on_cpu: bool = False, on_pack: Callable[[torch.Tensor], None] | None = None
    ):
        self.prefetch = prefetch
        self.copy_on_cpu = copy_on_cpu
        self.on_pack = on_pack
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None

    # ------------------------------------------------------------------ hooks

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A fresh ``saved_tensors_hooks`` context with this offloader's pack/unpack."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def wrap(self, checkpoint_fn: Callable) -> Callable:
        """``checkpoint_fn(function, *args, **kwargs)`` with this offloader's hooks around it.

        Both ``torch.utils.checkpoint`` flavours route exactly the inputs
        here: the non-reentrant one saves them as ``SavedTensor``\\ s before
        installing its own hooks; the reentrant one saves them with
        ``save_for_backward`` and runs the function under ``no_grad`` (nothing
        else is saved). A function that is already wrapped is unwrapped
        first, so wrapping twice never offloads twice.
        """
        inner = getattr(checkpoint_fn, "__wrapped__", checkpoint_fn) if hasattr(checkpoint_fn, _MARK) else checkpoint_fn

        @functools.wraps(inner)
        def offloaded_checkpoint(function, *args, **kwargs):
            with self.hooks():
                return inner(function, *args, **kwargs)

        setattr(offloaded_checkpoint, _MARK, self)
        return offloaded_checkpoint

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    @torch.no_grad()
    def _pack(self, t: torch.Tensor) -> _Packed:
        self.stats.packed += 1
        if self.on_pack is not None:
            self.on_pack(t)
        on_cuda = t.device.type == "cuda"
        if isinstance(t, nn.Parameter) or not (on_cuda or (t.device.type == "cpu" and self.copy_on_cpu)):
            # A parameter stays alive on its device anyway; a CPU tensor has
            # nowhere cheaper to go; other accelerators are not handled here.
            self.stats.kept += 1
            return _Packed(kept=t)
        h = _Packed(device=t.device)
        if on_cuda:
            compute = torch.cuda.current_stream(t.device)
            side = self._side_stream(t.device)
            # Dense host copy (strides are not kept: a layer input is contiguous).
            h.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            side.wait_stream(compute)  # t is produced by kernels still queued on the compute stream
            with torch.cuda.stream(side):
                h.host.copy_(t, non_blocking=True)
                h.d2h = side.record_event()
            # Without this the allocator could reuse t's block for the next
            # compute-stream tensor while the side stream still reads it.
            t.record_stream(side)
        else:
            h.host = t.detach().clone()
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += t.numel() * t.element_size()
        h.prev = self._last
        self._last = weakref.ref(h)
        return h

    @torch.no_grad()
    def _unpack(self, h: _Packed) -> torch.Tensor:
        self.stats.unpacked += 1
        h.unpacks += 1
        if h.kept is not None:
            return h.kept
        if h.ready is None:
            self._copy_back(h, ahead=False)
        else:
            self.stats.prefetched += 1
        out, event, alloc_stream = h.ready, h.h2d, h.ready_stream
        # backward owns the device copy now; the host copy stays for a re-unpack
        h.ready = h.h2d = h.ready_stream = None
        if out.device.type == "cuda":
            consumer = torch.cuda.current_stream(out.device)
            if event is not None:
                consumer.wait_event(event)
            if alloc_stream is not None and alloc_stream != consumer:
                out.record_stream(consumer)  # freed by the consumer: keep the allocator in its stream order
        if self.prefetch:
            prev = h.prev() if h.prev is not None else None
            if prev is not None and prev.unpacks == 0 and prev.ready is None and prev.kept is None:
                self._copy_back(prev, ahead=True)
        return out

    def _copy_back(self, h: _Packed, ahead: bool) -> None:
        """Make ``h.ready``: the input on its device (on CUDA: on the side stream if ``ahead``)."""
        if h.device.type != "cuda":
            h.ready = h.host.clone()
            return
        compute = torch.cuda.current_stream(h.device)
        # Allocated on the compute stream, which will use and free it.
        dst = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)
        h.ready_stream = compute
        if ahead:
            side = self._side_stream(h.device)
            side.wait_stream(compute)  # dst's block may have been freed by compute kernels still queued
            side.wait_event(h.d2h)
            with torch.cuda.stream(side):
                dst.copy_(h.host, non_blocking=True)
                h.h2d = side.record_event()
        else:
            compute.wait_event(h.d2h)
            dst.copy_(h.host, non_blocking=True)
            h.h2d = None
        h.ready = dst


def _checkpointed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)
        and callable(getattr(m, "_gradient_checkpointing_func", None))
    ]


def offload_checkpointed_inputs(model: nn.Module, offloader: ActivationOffloader | None = None) -> ActivationOffloader:
    """Route the checkpointed inputs of ``model``'s decoder layers through ``offloader``.

    Call after enabling non-reentrant per-layer checkpointing
    (:func:`qlora.train.setup.enable_checkpointing`): each transformers
    ``GradientCheckpointingLayer`` with checkpointing on gets its checkpoint
    function wrapped by :meth:`ActivationOffloader.wrap`. Calling it again
    replaces the previous offloader instead of stacking a second one.

    Args:
        model: a transformers model (or a module containing one).
        offloader: the hooks to use; a default :class:`ActivationOffloader` if None.

    Returns:
        The offloader (its ``stats`` count what went through it).

    Raises:
        InputError: no decoder layer has checkpointing enabled, so there
            would be nothing to offload.
    """
    layers = _checkpointed_layers(model)
    if not layers:
        raise InputError(
            f"offload_activations needs per-layer gradient checkpointing, but no decoder layer of "
            f"{type(model).__name__} has it enabled; set gradient_checkpointing: true "
            "(or turn offload_activations off)."
        )
    off = offloader or ActivationOffloader()
    for _, m in layers:
        m._gradient_checkpointing_func = off.wrap(m._gradient_checkpointing_func)
    device = next(model.parameters()).device
    if device.type == "cuda":
        log.info(
            "activation offload on: the checkpointed inputs of %d decoder layers go to pinned host memory on a side "
            "stream and are prefetched one layer ahead in backward (device memory saved: all but ~2 layer inputs; "
            "host memory used: all of them)", len(layers),
        )
    else:
        log.info(
            "activation offload on for %d decoder layers, but the model is on %s: the inputs already live in host "
            "memory, so the move is a no-op", len(layers), device.type,
        )
    return off


def offloader_of(model: nn.Module) -> ActivationOffloader | None:
    """The offloader installed on ``model``'s checkpointed layers, or None."""
    for _, m in _checkpointed_layers(model):
        off = getattr(m._gradient_checkpointing_func, _MARK, None)
        if off is not None:
            return off
    return None
