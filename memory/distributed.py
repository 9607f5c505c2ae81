"""Per-GPU memory of a run split over N GPUs: DDP replicas or FSDP2 shards (``qlora.train.parallel``).

Activations are per GPU already: each rank runs its own micro-batches of
``micro_batch_size`` sequences, so the dry-run profile's terms stay as they
are. What changes is who holds the frozen base and the adapter:

``ddp``
    Every GPU holds everything, as on one GPU. DDP adds its gradient buckets:
    the LoRA gradients live in flat all-reduce buffers allocated when the
    model is wrapped (``gradient_as_bucket_view``: the ``.grad`` tensors are
    views of them), so the adapter's gradient bytes are held all step instead
    of growing through backward (``ddp_buckets`` replaces ``lora_grads``).

``fsdp``
    FSDP2 splits every parameter along dim 0 (padded to a multiple of N):
    the 4-bit codes and scales, the 16-bit embedding and head, the adapter,
    and with them the optimizer state and the accumulated gradients, are
    1/N per GPU. Before a unit (a decoder layer, the embedding, the head)
    runs, its shards are all-gathered into whole tensors and freed after it:
    ``fsdp_gathered`` is that transient -- two decoder layers while the
    stack runs (the one computing and the one prefetched), the embedding
    at the start of the forward, the head during the loss. A tied embedding
    and head are one parameter, kept in the outermost unit, which FSDP2
    keeps gathered from its forward to the end of its backward: whole in
    every phase but the optimizer's. A layer's backward also holds its
    whole LoRA gradients until they are reduce-scattered.

``fsdp`` with ``offload_params``
    The shards live in pinned host memory instead (FSDP2's
    ``CPUOffloadPolicy``): each unit is copied to the GPU and gathered as it
    runs, its gradient shards go back to the host, and the optimizer steps
    there. The GPU keeps the gathered units, the activations and a layer's
    whole gradients; the host gets ``offloaded_params`` (this rank's shards
    of parameters, gradients and optimizer state). Every rank on a node
    holds its own, so a node with k GPUs needs k times the host figure.

Loading (phase ``load``, fsdp only)
    The trainer shards each decoder layer as soon as it has loaded, so no rank
    ever holds the whole base: the peak while loading is the shards so far plus
    one whole layer (and its PiSSA/OLoRA/LoftQ decomposition), or the embedding
    and head, which load whole after the last layer.

Not modelled: NCCL's own buffers (outside torch's allocator, like the CUDA
context; a few hundred MiB per process on recent NCCL versions, set by
``NCCL_BUFFSIZE`` and the channel count) -- part of why the margin exists.
"""

from __future__ import annotations

import dataclasses
import functools

from quant.dtypes import ITEMSIZE
from quant.errors import InputError
from quant.formats import NO_QUANT, weight_bytes

from .settings import Settings
from .spec import ModelSpec
from .terms import lora_tensors, quantize_transient_bytes

FSDP_OPTIMIZERS = ("adamw",)  # the trainer's rule (qlora.train.parallel): bitsandbytes cannot step DTensors
_SHARDED = ("nf4_weights", "base_weights_16bit", "embeddings_16bit", "lm_head_16bit", "lora_params",
            "optimizer_state")
_STACK_PHASES = ("forward", "backward")  # phases during which decoder layers are gathered
GATHERED_LAYERS = 2  # the layer computing and the one FSDP2 prefetches


def strategy_of(s: Settings) -> str:
    """The strategy the footprint models: ``single`` for one GPU, ``auto`` read as ``ddp``."""
    if s.gpus == 1:
        return "single"
    return "ddp" if s.strategy == "auto" else s.strategy


def check_fsdp_optimizer(s: Settings) -> None:
    """Raises InputError for fsdp with an optimizer that cannot step sharded parameters."""
    if strategy_of(s) == "fsdp" and s.optimizer not in FSDP_OPTIMIZERS:
        raise InputError(
            f"Optimizer {s.optimizer!r} cannot run with strategy fsdp: FSDP2 shards the adapter into DTensors, "
            f"which bitsandbytes' optimizers cannot step. Use optimizer adamw (its state is sharded too), or "
            f"strategy ddp."
        )


@functools.lru_cache(maxsize=256)
def _layer_bytes(spec: ModelSpec, shorts: tuple[str, ...], rank: int, dora: bool, adapter_dtype: str,
                 quant_type: str, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """(frozen weight bytes, LoRA bytes) of the largest decoder layer: what one gathered unit holds."""
    frozen: dict[int, int] = {}
    lora: dict[int, int] = {}
    for lin in spec.linears:
        if lin.layer is None or not lin.quantized:
            continue
        w = (2 * lin.in_features * lin.out_features if quant_type == NO_QUANT
             else weight_bytes(lin.in_features, lin.out_features, blocksize, double_quant))
        frozen[lin.layer] = frozen.get(lin.layer, 0) + w
        if lin.short in shorts:
            t = lora_tensors(lin.in_features, lin.out_features, rank, dora, ITEMSIZE[adapter_dtype])
            lora[lin.layer] = lora.get(lin.layer, 0) + sum(n * size for n, size in t)
    layers = frozen.keys()
    return max(frozen.values(), default=0), max((lora.get(k, 0) for k in layers), default=0)


def per_gpu(candidates: dict[str, dict[str, int]], spec: ModelSpec, s: Settings,
            shorts: tuple[str, ...]) -> tuple[dict[str, dict[str, int]], int]:
    """One GPU's terms per phase, from the single-GPU ``candidates`` (phase -> term -> bytes).

    Returns:
        ``(terms, host)``: new mappings (the input is not changed; one GPU returns them as they are),
        and the bytes ``offload_params`` puts in this rank's pinned host memory (0 without it).

    Raises:
        InputError: fsdp with an optimizer it cannot drive; ``offload_params`` without fsdp on 2+ GPUs.
    """
    strategy = strategy_of(s)
    if s.offload_params is True and strategy != "fsdp":
        raise InputError(f"offload_params moves FSDP2's shards to the host: it needs strategy fsdp on 2 or more "
                         f"GPUs, but the run is {strategy if strategy != 'single' else 'on one GPU'}. Set "
                         f"offload_params off, or plan --gpus 2 --strategy fsdp.")
    if strategy == "single":
        return candidates, 0
    check_fsdp_optimizer(s)
    n = s.gpus
    out = {phase: dict(terms) for phase, terms in candidates.items()}
    if strategy == "ddp":
        buckets = candidates["optimizer"]["lora_params"]  # gradients in the parameters' dtype
        for terms in out.values():
            terms["lora_grads"] = 0
            terms["ddp_buckets"] = buckets
        return out, 0
    frozen_layer, lora_layer = _layer_bytes(spec, shorts, s.rank, s.dora, s.adapter_dtype, s.quant_type,
                                            s.blocksize, s.double_quant)
    head = candidates["loss"]["embeddings_16bit" if spec.tied_embeddings else "lm_head_16bit"]
    emb = candidates["loss"]["embeddings_16bit"]
    offload = s.offload_params is True
    host = 0
    init = out.pop("init", None)  # under fsdp a layer's init runs while it loads whole: part of "load" below
    for phase, terms in out.items():
        shards = {k: -(-terms.get(k, 0) // n) for k in _SHARDED}
        grads = terms.get("lora_grads", 0)
        if phase == "optimizer":  # the state of this rank's shards, and the gradients of the whole adapter
            host = sum(shards.values()) + -(-grads // n)
        for k, v in shards.items():
            terms[k] = 0 if offload else v
        # accumulated gradients are sharded (on the host with offload); a layer's backward holds its whole
        # LoRA gradients first
        terms["lora_grads"] = (0 if offload else -(-grads // n)) + (lora_layer if phase == "backward" and grads else 0)
        if offload:
            terms["optimizer_step"] = 0  # the step runs on the host, on the host's shards
        # a unit's shard is copied to the GPU before it is gathered when the shards live on the host
        unit = (frozen_layer + lora_layer) * (1 + (1 / n if offload else 0))
        stack = int(GATHERED_LAYERS * unit)
        if spec.tied_embeddings:  # gathered with the outermost unit from the forward to the end of the backward
            terms["fsdp_gathered"] = {"loss": emb, "forward": emb + stack, "backward": emb + stack}.get(phase, 0)
        else:  # the forward starts with the embedding gathered alone; the head is gathered for the loss
            terms["fsdp_gathered"] = {"loss": head, "forward": max(stack, emb), "backward": stack}.get(phase, 0)
    largest = max((lin.numel for lin in spec.linears if lin.layer is not None and lin.quantized), default=0)
    out["load"] = _load_phase(candidates["forward"], n, offload, frozen_layer + lora_layer, emb,
                              0 if spec.tied_embeddings else head, quantize_transient_bytes(largest, s.device),
                              init["init_transient"] if init else 0)
    return out, host if offload else 0


def _load_phase(persistent: dict[str, int], n: int, offload: bool, layer: int, emb: int, head: int,
                quantize: int, init: int) -> dict[str, int]:
    """Loading under fsdp (``qlora.train.build``): each decoder layer is sharded as soon as it has loaded.

    So a rank holds the layers' shards (on the host with ``offload_params``) and, on top, the worse of
    three moments: the loading layer's largest weight being quantized (``quantize`` bytes of temporaries,
    before the layer's adapter exists); the layer whole with its adapter, and its PiSSA/OLoRA/LoftQ
    decomposition (``init``) when there is one; the embedding and head, which load after the last layer,
    whole until the trainer shards them. The shards counted include the loading layer's: ``fully_shard``
    copies them out before it frees the whole tensors.
    """
    shards = {k: 0 if offload else -(-persistent.get(k, 0) // n)
              for k in ("nf4_weights", "base_weights_16bit", "lora_params")}
    shards["norms_biases_buffers"] = persistent.get("norms_biases_buffers", 0)
    moments = (dict(shards, load_transient=quantize), dict(shards, fsdp_gathered=layer, load_transient=init),
               dict(shards, embeddings_16bit=emb, lm_head_16bit=head))
    return max(moments, key=lambda t: sum(t.values()))


MAX_GPUS = 64  # how far gpus="auto" looks


def per_gpu_batch(effective_batch_size: int, gpus: int) -> int:
    """Sequences per optimizer step on each of ``gpus`` GPUs: the effective batch split, rounded up."""
    return -(-effective_batch_size // gpus)


def choose(plan_fn, gpu, spec: ModelSpec, base: Settings, ram):
    """``gpus`` and ``strategy`` ``"auto"`` for :func:`memory.plan` (``plan_fn``), with the rest as given.

    ``gpus="auto"``: the fewest GPUs (1..:data:`MAX_GPUS`) on which the run fits. ``strategy="auto"``
    on N > 1: ddp when it fits (no gathers, and bitsandbytes' optimizers work), else fsdp, planned
    with optimizer adamw when the settings name a bitsandbytes one (the plan says so).
    """
    if base.gpus == "auto":
        first = None
        for n in range(1, MAX_GPUS + 1):
            mb, eff = base.micro_batch_size, base.effective_batch_size
            if first is not None and mb != "auto" and mb > per_gpu_batch(eff, n):  # memory.plan would refuse it
                return dataclasses.replace(first, notes=first.notes + (
                    f"gpus auto: 1 to {n - 1} GPUs do not fit, and {n} or more would give each GPU less than "
                    f"micro-batch {mb} of the effective batch {eff}: raise effective_batch_size or lower "
                    f"micro_batch_size",))
            p = choose(plan_fn, gpu, spec, dataclasses.replace(base, gpus=n), ram)
            first = first or p
            if p.fits:
                note = f"gpus auto: {n} is the fewest GPUs that fit" + (f" ({p.footprint.strategy})" if n > 1 else "")
                return dataclasses.replace(p, notes=p.notes + (note,))
        return dataclasses.replace(first, notes=first.notes + (f"gpus auto: not even {MAX_GPUS} GPUs fit",))
    if base.gpus == 1 or base.strategy == "ddp":
        return plan_fn(gpu, spec, dataclasses.replace(base, offload_params=base.offload_params is True), ram=ram)
    notes: list[str] = []
    if base.strategy == "auto":
        ddp = plan_fn(gpu, spec, dataclasses.replace(base, strategy="ddp", offload_params=False), ram=ram)
        if ddp.fits:
            return dataclasses.replace(ddp, notes=ddp.notes + ("strategy auto: ddp (each GPU holds the whole base)",))
        base = dataclasses.replace(base, strategy="fsdp")
        why = "ddp does not fit"
        if base.optimizer not in FSDP_OPTIMIZERS:
            base = dataclasses.replace(base, optimizer="adamw")
            why += f"; planned with optimizer adamw, which fsdp needs (not {ddp.settings.optimizer})"
        notes.append(f"strategy auto: fsdp ({why})")
    else:
        ddp = None
    if base.offload_params != "auto":
        p = plan_fn(gpu, spec, base, ram=ram)
    else:
        p = plan_fn(gpu, spec, dataclasses.replace(base, offload_params=False), ram=ram)
        if not p.fits:
            on = plan_fn(gpu, spec, dataclasses.replace(base, offload_params=True), ram=ram)
            if on.fits:
                p = on
                notes.append("offload_params auto: on (fsdp's shards in pinned host memory; it does not fit without)")
    if not p.fits and ddp is not None and ddp.peak_bytes <= p.peak_bytes:
        return ddp  # nothing fits: report the closer of the two (its suggestions say what would)
    return dataclasses.replace(p, notes=p.notes + tuple(notes))
