"""Dry runs of a training step on the meta device, recorded allocation by allocation.

What a step keeps alive depends on the architecture's own forward code:
RMSNorm's fp32 upcast, how RoPE copies q and k, whether k/v are repeated
for GQA, Phi-3's fused projections whose views keep a whole fused output
alive, Gemma-2's extra norms and soft-capping, which tensors LoRA saves and
whether they are shared. Instead of re-deriving those per family, the probe
*executes* the model on the ``meta`` device (shapes only: no memory, no
weights, no arithmetic) under :class:`~memory.tracker.LiveTensorTracker` and
records every allocation and free:

* the real transformers classes, built from the config with ``1 + p``
  decoder layers (layer 0 differs from the rest -- its input needs no
  gradient -- and ``p`` covers each distinct layer type, e.g. Gemma-2's
  sliding/full pair);
* the real ``quant.NF4Linear`` for every quantized linear, dequantizing
  through quant's own code path (:class:`memory.kernels.ProbeNF4Linear`),
  or, with ``quant_type="none"``, the model's own frozen ``nn.Linear``;
* the real adapter layers, ``layers.LoRALinear`` or ``layers.DoRALinear``
  (the very classes qlora trains with), on the targeted linears;
* transformers' activation checkpointing (non-reentrant) when enabled;
* ``scaled_dot_product_attention`` and ``dropout`` routed to the target
  device's kernels (:mod:`memory.kernels`).

Two dry runs make up a step. :func:`body_run` is the decoder stack (embeddings,
layers, final norm) forward and backward, the backward seeded with a
gradient for the final hidden states. :func:`head_run` is the output head
and transformers' causal-LM loss on those hidden states (the model's own
``forward`` with the decoder stack stubbed out), forward and backward.
:mod:`memory.profile` fits and joins them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from layers import AdaLoRALinear, DoRALinear, LoRALinear, VeRALinear, VeRAProjections
from layers.tiling import tile_mlps, tile_norms
from quant.dtypes import DTYPES
from quant.errors import InputError
from quant.formats import NO_QUANT
from quant.model import linear_names, skipped_names

from .kernels import ProbeNF4Linear, device_dropout, device_sdpa
from .meta import layers_prefix, meta_model
from .profile import TAGS
from .spec import ModelSpec
from .tracker import LiveTensorTracker, storage_key

log = logging.getLogger(__name__)

# TAGS (memory.profile): what a live storage was allocated for.


@dataclass
class Timeline:
    """Live bytes per tag after every allocation or free of one dry run.

    Attributes:
        live: int64 ``(events, tags)``: ``live[i, t]`` = bytes tagged
            ``TAGS[t]`` alive after event i.
        markers: marker name -> index into ``live`` of the state at that
            moment (-1: before any event). Body runs have ``F{i}`` (layer i
            forward starts), ``E`` (the final norm starts), ``H`` (the
            stack's output is handed to the head), ``S`` (the seed gradient
            exists), ``B{i}`` (layer i backward starts) and ``Z`` (done).
    """

    live: torch.Tensor
    markers: dict[str, int]


def probe_layer_types(spec: ModelSpec) -> tuple[str, ...]:
    """Layer types of the short probe stack: layer 0's type, then each distinct later type once."""
    types = [spec.layer_types[0]]
    for t in spec.layer_types[1:]:
        if t not in types[1:]:
            types.append(t)
    if len(types) == 1:  # a one-layer model: still probe a "later" layer so the fit has its shape
        types.append(spec.layer_types[0])
    return tuple(types)


def probe_model(
    spec: ModelSpec, num_layers: int, targets: tuple[str, ...], rank: int, dropout: float, dora: bool,
    adapter_dtype: str, attn: str, checkpointing: bool, device: str, quant_type: str, blocksize: int,
    double_quant: bool, tracker: LiveTensorTracker, window: int | None = None, vera: bool = False,
    adalora: bool = False,
) -> nn.Module:
    """The probe model on meta: 4-bit linears, LoRA (or DoRA) on ``targets``, everything else frozen.

    ``num_layers`` decoder layers (:func:`probe_layer_types`; 0 for the head run). Quantized linears are
    :class:`~memory.kernels.ProbeNF4Linear` reporting to ``tracker`` (with ``quant_type="none"`` they
    stay the model's frozen bf16 ``nn.Linear``, as the loader leaves them); in-layer ``targets``
    (``self_attn.q_proj``) are wrapped in the real ``layers.LoRALinear`` / ``layers.DoRALinear`` /
    ``layers.VeRALinear`` (on meta shared matrices sized to the targets) / ``layers.AdaLoRALinear``.
    ``window`` replaces the config's ``sliding_window`` (:func:`probe_window`).
    """
    facts = spec.config
    if window is not None:
        facts["sliding_window"] = window
    types = probe_layer_types(spec)[:num_layers] if num_layers else ()
    if num_layers and ("layer_types" in facts or len(set(spec.layer_types)) > 1):
        facts["layer_types"] = list(types)
    model = meta_model(facts, num_layers=num_layers, attn_implementation=attn)
    model.requires_grad_(False)
    keep16 = skipped_names(model)
    prefix = layers_prefix(model) if num_layers else ""
    projections = _meta_projections(model, targets, prefix, rank, adapter_dtype) if vera and num_layers else None
    for name in linear_names(model):
        if name in keep16:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        if quant_type == NO_QUANT:
            q = lin
        else:
            q = ProbeNF4Linear(
                lin.in_features, lin.out_features, lin.bias is not None, quant_type, blocksize, double_quant,
                torch.bfloat16, torch.bfloat16, device="meta",
            )
            q.tracker = tracker
        short = name[len(prefix):].partition(".")[2] if prefix and name.startswith(prefix) else name
        if short in targets:
            # init=None: meta tensors hold no values, so skip the RNG draw (and DoRA's norm at build)
            if projections is not None:
                q = VeRALinear(q, projections, dropout=dropout)
            elif adalora:
                q = AdaLoRALinear(q, rank, 2.0 * rank, dropout, init=None, dtype=DTYPES[adapter_dtype])
            else:
                layer = DoRALinear if dora else LoRALinear
                q = layer(q, rank, 2.0 * rank, dropout, init=None, dtype=DTYPES[adapter_dtype])
        setattr(parent, child, q)
    model.config.use_cache = False
    if checkpointing:
        # what qlora's trainer does (qlora.train.setup.enable_checkpointing): one
        # non-reentrant checkpoint per decoder layer; transformers >= 5 renamed the call
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def _meta_projections(model: nn.Module, targets: tuple[str, ...], prefix: str, rank: int,
                      adapter_dtype: str) -> VeRAProjections:
    """VeRA's shared matrices on meta, sized to the probe model's in-layer targets (as the trainer sizes them)."""
    lins = [model.get_submodule(n) for n in linear_names(model)
            if n.startswith(prefix) and n[len(prefix):].partition(".")[2] in targets]
    dt = DTYPES[adapter_dtype]
    a = torch.empty(rank, max(m.in_features for m in lins), dtype=dt, device="meta")
    return VeRAProjections(a, torch.empty(max(m.out_features for m in lins), rank, dtype=dt, device="meta"))


class _Seed(torch.autograd.Function):
    """A scalar root whose backward hands the stack a fresh gradient for its output.

    The gradient (tag ``seed``) is what the head's backward produces; made
    here, it is owned by autograd and freed when the final norm's backward
    has consumed it, as in a real step. Marker ``S`` follows its allocation.
    """

    @staticmethod
    def forward(ctx, hidden, tracker):
        ctx.shape, ctx.dtype, ctx.tracker = hidden.shape, hidden.dtype, tracker
        return hidden.new_empty(())

    @staticmethod
    def backward(ctx, _grad):
        with ctx.tracker.tagged("seed"):
            seed = torch.empty(ctx.shape, dtype=ctx.dtype, device="meta")
        ctx.tracker.mark("S")
        return seed, None


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layers_prefix(model)[:-1])


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def body_run(
    spec: ModelSpec, batch: int, seq: int, rank: int, targets: tuple[str, ...], dropout: float = 0.0,
    dora: bool = False, adapter_dtype: str = "bfloat16", attn: str = "sdpa", checkpointing: bool = True,
    device: str = "cuda", quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
    window: int | None = None, mlp_tile_tokens: int | None = None, norm_tile_tokens: int | None = None,
    vera: bool = False, adalora: bool = False,
) -> Timeline:
    """Forward and backward of the decoder stack (``1 + p`` layers) on meta.

    Args:
        spec: the model.
        batch, seq, rank: the shape to run at (rank is the LoRA rank).
        targets: in-layer names of the linears that get LoRA (``self_attn.q_proj``...).
        dropout, dora, adapter_dtype: the LoRA variant.
        attn: ``'sdpa'`` or ``'eager'`` (transformers' attn_implementation).
        checkpointing: transformers' activation checkpointing per layer.
        device: ``'cuda'`` or ``'cpu'``: which device's kernels to allocate like.
        quant_type, blocksize, double_quant: the 4-bit format, or ``quant_type="none"``: 16-bit linears.
        window: the sliding window to run with instead of the config's (:func:`probe_window`).
        mlp_tile_tokens: every MLP tiled as the trainer tiles it (:mod:`layers.tiling`), running its
            first two tiles only: every later tile allocates what the second did.
        norm_tile_tokens: every norm tiled likewise (the final norm included).

    Returns:
        The :class:`Timeline`. Weights and LoRA parameters exist before the
        run and are not in it; ``input_ids`` and ``labels`` are. The final
        hidden states count as handed to the head at marker ``H``; the
        gradient that comes back for them is allocated between ``H`` and ``S``.
    """
    tracker = LiveTensorTracker("meta", record=True)
    model = probe_model(
        spec, len(probe_layer_types(spec)), targets, rank, dropout, dora, adapter_dtype, attn, checkpointing,
        device, quant_type, blocksize, double_quant, tracker, window, vera, adalora,
    )
    if mlp_tile_tokens:
        tile_mlps(model, mlp_tile_tokens, max_tiles=2)
    if norm_tile_tokens:
        tile_norms(model, norm_tile_tokens, max_tiles=2)
    layers = _decoder_layers(model)
    handles = []

    def on_pre(i):
        def hook(_mod, _args):
            tracker.mark(f"F{i}")
            tracker.tag = "fwd"
        return hook

    def on_post(i):
        def hook(_mod, _args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if t.requires_grad:
                def grad_hook(g, i=i):
                    # the gradient flowing into layer i: produced by the segment that
                    # ends here, consumed by the one that starts
                    tracker.retag(g, "seed")
                    tracker.mark(f"B{i}")
                    tracker.tag = "bwd"
                t.register_hook(grad_hook)
        return hook

    def on_norm(_mod, _args):
        # After the model's loop has moved on from the last layer (so the free of the
        # previous layer's output lands in the last layer's segment, as it does in
        # every other layer's), before the final norm.
        tracker.mark("E")
        tracker.tag = "head"  # the final norm: part of the stack, but not of any layer

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_pre(i)))
        handles.append(layer.register_forward_hook(on_post(i)))
    final_norm = getattr(_base(model), "norm", None)
    if not isinstance(final_norm, nn.Module):
        raise InputError(
            f"{type(model).__name__} has no final 'norm' module after its decoder layers; the memory probe "
            "supports decoder-only LMs laid out like Llama (embed_tokens, layers, norm)."
        )
    handles.append(final_norm.register_forward_pre_hook(on_norm))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with _probe_context(device), tracker:
            tracker.tag = "inputs"
            ids = torch.zeros((batch, seq), dtype=torch.int64, device="meta")
            labels = torch.zeros((batch, seq), dtype=torch.int64, device="meta")  # held by the caller all step
            tracker.tag = "pre"
            hidden = _base(model)(input_ids=ids, use_cache=False)[0]
            # The head (its own dry run) reads the final hidden states and drops
            # them; here they only root the backward, so they count as freed.
            tracker.release(hidden)
            tracker.mark("H")
            root = _Seed.apply(hidden, tracker)
            del hidden
            root.backward()
            del root
            tracker.mark("Z")
            del ids, labels
    finally:
        for h in handles:
            h.remove()
    return _timeline(tracker, {storage_key(p.grad) for p in params if p.grad is not None})


def head_run(spec: ModelSpec, batch: int, seq: int, attn: str = "sdpa", device: str = "cuda") -> Timeline:
    """The output head and transformers' causal-LM loss, forward and backward, on meta.

    Runs the model's own ``forward`` (so head slicing, Gemma-2's final
    soft-capping and ``loss_function`` are the library's code) with the
    decoder stack replaced by a stub that returns fresh ``(b, s, hidden)``
    bf16 states. The gradient that reaches them is tagged ``seed``; it is
    what the run leaves behind for the stack's backward.
    """
    tracker = LiveTensorTracker("meta", record=True)
    model = probe_model(spec, 0, (), 1, 0.0, False, "bfloat16", attn, False, device, "nf4", 64, True, tracker)
    stub = _StackStub(batch, seq, spec.hidden_size)
    setattr(model, model.base_model_prefix, stub)
    with _probe_context(device), tracker:
        ids = torch.zeros((batch, seq), dtype=torch.int64, device="meta")
        labels = torch.zeros((batch, seq), dtype=torch.int64, device="meta")
        tracker.forget()  # ids/labels are counted by the body run
        tracker.tag = "head"
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        del loss
    return _timeline(tracker, set(), seed_keys={storage_key(g) for g in stub.grads})


class _StackStub(nn.Module):
    """Stands in for the decoder stack: returns fresh (b, s, hidden) bf16 states that need grad.

    The states are a fresh non-leaf tensor (made from an untracked leaf by
    :class:`_Fresh`), so, like the real stack's output, nothing but the
    head's own references keeps them alive, and no gradient is accumulated
    into the leaf. The gradient that reaches them is kept in ``grads``: it
    is what the stack's backward receives.
    """

    def __init__(self, batch: int, seq: int, hidden: int):
        super().__init__()
        self.leaf = torch.empty((batch, seq, hidden), dtype=torch.bfloat16, device="meta", requires_grad=True)
        self.grads: list[torch.Tensor] = []

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        h = _Fresh.apply(self.leaf)
        h.register_hook(self.grads.append)
        return BaseModelOutputWithPast(last_hidden_state=h)


class _Fresh(torch.autograd.Function):
    """A new tensor shaped like ``x`` that requires grad, whose gradient stops here."""

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, _grad):
        return None


# ---------------------------------------------------------------------------- meta-device shims


@functools.cache
def _warm_up() -> None:
    """Make the first 4-bit dequantization of the process happen outside any dry run.

    bitsandbytes loads its kernels on first use and logs failures with a
    traceback; a log handler that keeps records (pytest's does) then keeps
    the frames of that call -- and the tensors in them -- alive, which would
    make the first dry run differ from every later one.
    """
    with _meta_autocast():
        ProbeNF4Linear(64, 64, device="meta").dequantize(torch.bfloat16)


@contextlib.contextmanager
def _probe_context(device: str) -> Iterator[None]:
    _warm_up()
    with device_sdpa(device), device_dropout(device), _unpacked_batches(), _meta_autocast():
        yield


@contextlib.contextmanager
def _unpacked_batches() -> Iterator[None]:
    """Answer transformers' packed-sequence check with "not packed" without reading data.

    ``find_packed_sequence_indices`` inspects position ids (``.all()``), which
    meta tensors cannot do. The planner models unpacked rows, for which the
    answer is None; the few b*s-sized integer temporaries of the check are
    freed before the first layer and can never be a peak.
    """
    import transformers.masking_utils as mu

    original = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = original


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    """Let ``torch.autocast("meta", enabled=False)`` be the no-op it means.

    ``quant.NF4Linear`` switches autocast off around its matmul with
    ``torch.autocast(x.device.type, enabled=False)``; torch has no autocast
    state for the meta device and raises. Nothing in the probe runs under
    autocast, so a null context changes no dtype.
    """
    original = torch.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == "meta":
            return contextlib.nullcontext()
        return original(device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = original


# ---------------------------------------------------------------------------- events -> timeline


def _timeline(tracker: LiveTensorTracker, grad_keys: set[int], seed_keys: set[int] = frozenset()) -> Timeline:
    """Replay the event list into per-tag live bytes.

    Storages that end up as LoRA ``.grad`` are re-tagged ``grad`` (and the
    gradient on the head stub's input ``seed``) from their allocation on:
    autograd often hands the very tensor a backward op produced to ``.grad``.
    """
    index = {t: i for i, t in enumerate(TAGS)}
    live_alloc: dict[int, int] = {}
    for n, ev in enumerate(tracker.events):  # the allocation event of each storage alive at the end
        if ev.marker is None:
            if ev.nbytes > 0:
                live_alloc[ev.key] = n
            else:
                live_alloc.pop(ev.key, None)
    retag = {live_alloc[k]: "grad" for k in grad_keys if k in live_alloc}
    retag.update({live_alloc[k]: "seed" for k in seed_keys if k in live_alloc})
    tag_of: dict[int, int] = {}
    tags: list[int] = []
    sizes: list[int] = []
    markers: dict[str, int] = {}
    for n, ev in enumerate(tracker.events):
        if ev.marker is not None:
            markers[ev.marker] = len(sizes) - 1
            continue
        if ev.nbytes > 0:
            t = index[retag.get(n, ev.tag)]
            tag_of[ev.key] = t
        else:
            t = tag_of.pop(ev.key)
        tags.append(t)
        sizes.append(ev.nbytes)
    delta = torch.zeros((len(sizes), len(TAGS)), dtype=torch.int64)
    if sizes:
        delta[torch.arange(len(sizes)), torch.tensor(tags)] = torch.tensor(sizes, dtype=torch.int64)
    return Timeline(delta.cumsum(0), markers)
