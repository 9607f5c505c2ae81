"""The footprint of one QLoRA training step: peak = max over phases of persistent + phase terms.

Persistent (alive all step, exact from shapes, :mod:`memory.terms`):
    ``nf4_weights``            4-bit codes + scales (+ code tables) of every quantized linear
    ``base_weights_16bit``     the same linears left 16-bit instead (``quant_type="none"``, plain LoRA)
    ``embeddings_16bit``       input embeddings (a tied head is counted here, once)
    ``lm_head_16bit``          an untied output head (never quantized)
    ``norms_biases_buffers``   norm weights, linear biases, RoPE buffers
    ``lora_params``            A (r, in), B (out, r) [, DoRA m (out,)] in the adapter dtype; VeRA: d (r,), b (out,)
                               in float32
    ``vera_matrices``          VeRA's shared frozen A (r, max_in) and B (max_out, r) in the adapter dtype
    ``adalora_state``          AdaLoRA's importance EMAs: two float32 per adapter entry (qlora.lora.adalora)
    ``optimizer_state``        on the device (paged state is reported as ``host_bytes``)

Phase terms (from the meta-device dry runs, :mod:`memory.profile`, or
closed form for the chunked loss):
    ``inputs``                 input ids and labels
    ``saved_activations``      checkpointed layer inputs (or, without checkpointing, everything saved)
    ``logits_loss``            final norm, logits and loss
    ``layer_backward``         one layer's recompute, backward temporaries and the gradient flowing between layers
    ``dequantized_weight``     dense weights rebuilt by the 4-bit layers at that moment
    ``lora_grads``             adapter gradients allocated so far
    ``optimizer_step``         temporaries of ``optimizer.step()`` (phase "optimizer" only)
    ``ddp_buckets``            on N GPUs with DDP: the adapter gradients' all-reduce buffers
    ``fsdp_gathered``          on N GPUs with FSDP2: the units gathered at that moment (:mod:`memory.distributed`)
    ``block_mask``             packed rows under sdpa: the (b, 1, s, s) block mask, and its additive copy during
                               an attention call (:func:`memory.terms.block_mask_bytes`)
    ``init_transient``         PiSSA/OLoRA/LoftQ at load time: the largest target layer's decomposition
                               (phase ``init``, before any step: weights and adapter only)
    ``load_transient``         fsdp only (phase ``load``): the loading layer's quantization or init
                               temporaries, while the layers before it are already shards

Phases: ``forward`` (embeddings through the final norm), ``loss`` (logits
and loss, forward and backward), ``backward`` (the decoder stack, top layer
to bottom), ``optimizer`` (the step). The breakdown lists the terms at the
worst moment of the worst phase; they sum to ``tensor_peak_bytes``.

Reported apart from the tensor peak (``torch.cuda.max_memory_allocated`` does
not see them, nvidia-smi does): ``cuda_context_bytes`` and
``allocator_reserve_bytes`` (cache and fragmentation of the caching allocator).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import MappingProxyType

from quant.dtypes import ITEMSIZE
from quant.errors import InputError, choices
from quant.formats import NO_QUANT, bits_per_param, check_args, nested_table_bytes, weight_bytes

from .catalog import DEFAULT_MODEL
from .distributed import per_gpu, strategy_of
from .host import HostMemory, host_memory
from .profile import TAGS, body_profile, hf_head_segment, probe_window
from .settings import ATTN, Settings, with_changes
from .spec import ModelSpec, load_spec
from .targets import resolve_targets
from .terms import (
    INIT_TRANSIENT,
    block_mask_bytes,
    chunked_loss_segment,
    init_transient_bytes,
    lora_tensors,
    optimizer_shared_bytes,
    optimizer_state_bytes,
    optimizer_step_temporaries,
)

log = logging.getLogger(__name__)

TERMS = {
    "nf4_weights": "4-bit weights + scales",
    "base_weights_16bit": "base linears (16-bit)",
    "embeddings_16bit": "embeddings (16-bit)",
    "lm_head_16bit": "lm_head (16-bit)",
    "norms_biases_buffers": "norms, biases, buffers",
    "lora_params": "LoRA parameters",
    "vera_matrices": "VeRA shared matrices",
    "adalora_state": "AdaLoRA importance state",
    "optimizer_state": "optimizer state (device)",
    "inputs": "input ids + labels",
    "saved_activations": "activations kept for backward",
    "logits_loss": "final norm, logits + loss",
    "layer_backward": "layer recompute + backward",
    "dequantized_weight": "dequantized weight (transient)",
    "lora_grads": "LoRA gradients",
    "optimizer_step": "optimizer step temporaries",
    "ddp_buckets": "DDP gradient buckets",
    "block_mask": "packed rows: block mask (sdpa)",
    "init_transient": "init from the weights: one layer's SVD/QR",
    "load_transient": "loading: a weight's quantization or init",
    "fsdp_gathered": "FSDP units gathered (transient)",
}
_TAG_TERM = {
    "inputs": "inputs", "pre": "saved_activations", "fwd": "saved_activations", "head": "logits_loss",
    "seed": "layer_backward", "bwd": "layer_backward", "dequant": "dequantized_weight", "grad": "lora_grads",
}


@dataclass(frozen=True)
class Footprint:
    """Predicted memory of one training step (step 2 onward: optimizer state exists).

    Attributes:
        breakdown: term -> bytes at the peak moment (keys of :data:`TERMS`);
            sums to ``tensor_peak_bytes``.
        phases: phase -> tensor bytes at that phase's worst moment.
        peak_phase: the phase holding the peak.
        tensor_peak_bytes: what ``torch.cuda.max_memory_allocated`` should read.
        host: the host side (:class:`memory.host.HostMemory`): paged optimizer
            state, offloaded layer inputs in pinned memory, the process and the
            loader's transient; ``host.total_bytes`` is what RAM must hold.
        cuda_context_bytes, allocator_reserve_bytes: on top of the tensor peak
            on a GPU (0 for ``device='cpu'``).
        quantized_params, lora_params: element counts; ``quantized_params`` are the
            base linears the format applies to (all but the output head), so they are
            16-bit weights with ``quant_type="none"``.
        nf4_bits_per_param: storage bits per ``quantized_params`` element (16.0 with ``none``).
        tiled_mlp, tiled_norms: whether the MLPs, the norms run in tiles (``layers.tiling``).
        tile_tokens: tokens per tile when either runs tiled (at most ``b*s``: one tile), else None.
        gpus, strategy: the GPUs the run is split over and how (``single``, ``ddp``, ``fsdp``); the
            terms are one GPU's. offload_params: fsdp's shards live in pinned host memory.
        The remaining attributes echo the settings.
    """

    model: str
    device: str
    seq_len: int
    micro_batch_size: int
    rank: int
    targets: tuple[str, ...]
    dropout: float
    dora: bool
    adapter_dtype: str
    optimizer: str
    gradient_checkpointing: bool
    attn: str
    loss: str
    loss_chunk_tokens: int | None
    breakdown: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    tensor_peak_bytes: int
    cuda_context_bytes: int
    allocator_reserve_bytes: int
    quantized_params: int
    lora_params: int
    nf4_bits_per_param: float
    host: HostMemory
    offload_activations: bool = False
    quant_type: str = "nf4"
    tiled_mlp: bool = False
    tiled_norms: bool = False
    tile_tokens: int | None = None
    gpus: int = 1
    strategy: str = "single"
    offload_params: bool = False
    vera: bool = False
    adalora: bool = False

    @property
    def host_bytes(self) -> int:
        """Paged optimizer state (host-backed unified memory) plus offloaded layer inputs (pinned)."""
        return self.host.paged_optimizer_state + self.host.pinned_offload

    @property
    def device_total_bytes(self) -> int:
        """Tensor peak + CUDA context + allocator reserve: what the device must hold."""
        return self.tensor_peak_bytes + self.cuda_context_bytes + self.allocator_reserve_bytes


# ---------------------------------------------------------------------------- validation


def resolve_attn(spec: ModelSpec, attn: str) -> str:
    """``auto`` -> ``sdpa`` where the architecture supports it, else ``eager``.

    Raises:
        InputError: an unknown implementation, or ``sdpa`` requested for an
            architecture without it (Gemma-2).
    """
    if attn not in ATTN:
        raise InputError(f"Unknown attention implementation {attn!r}; valid choices are {choices(ATTN)}.")
    if attn == "auto":
        return "sdpa" if spec.supports_sdpa else "eager"
    if attn == "sdpa" and not spec.supports_sdpa:
        raise InputError(
            f"{spec.name} ({spec.lm_class}) has no sdpa attention in the installed transformers; "
            "use attn 'eager' or 'auto'."
        )
    return attn


def _spec(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else load_spec(model)


# ---------------------------------------------------------------------------- persistent terms


def weight_terms(
    spec: ModelSpec, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, device: str = "cuda"
) -> dict[str, int]:
    """Bytes of the frozen model on the device (16-bit parts in bf16).

    The base linears (all but the output head) are ``nf4_weights`` in a 4-bit
    format, or ``base_weights_16bit`` (2 bytes per weight) with ``quant_type="none"``;
    the other of the two is 0.
    """
    quantized = [lin for lin in spec.linears if lin.quantized]
    nf4 = dense = 0
    if quant_type == NO_QUANT:
        dense = 2 * sum(lin.numel for lin in quantized)
    else:
        check_args(quant_type, blocksize)
        nf4 = sum(weight_bytes(lin.in_features, lin.out_features, blocksize, double_quant) for lin in quantized)
        nf4 += nested_table_bytes(len(quantized), double_quant, device)
    g = spec.frozen_16bit
    return {
        "nf4_weights": nf4,
        "base_weights_16bit": dense,
        "embeddings_16bit": 2 * g["embeddings"],
        "lm_head_16bit": 2 * g["lm_head"],
        "norms_biases_buffers": 2 * (g["norms"] + g["linear biases"] + g["other"]) + spec.buffer_bytes,
    }


def adapter_tensors(
    spec: ModelSpec, targets: tuple[str, ...], rank: int, dora: bool, adapter_dtype: str, vera: bool = False,
    adalora: bool = False,
) -> list[tuple[int, int]]:
    """(elements, bytes per element) of every trainable adapter tensor (VeRA: b and d, float32; AdaLoRA: + E)."""
    out: list[tuple[int, int]] = []
    for lin in spec.linears:
        if lin.layer is not None and lin.quantized and lin.short in targets:
            if vera:
                out.extend([(lin.out_features, 4), (rank, 4)])
            else:
                out.extend(lora_tensors(lin.in_features, lin.out_features, rank, dora, ITEMSIZE[adapter_dtype]))
                if adalora:
                    out.append((rank, 4))  # E, float32 (layers.adalora)
    return out


def vera_matrix_bytes(spec: ModelSpec, targets: tuple[str, ...], rank: int, adapter_dtype: str) -> int:
    """VeRA's shared frozen ``(r, max_in)`` and ``(max_out, r)`` in the adapter dtype, over the targets."""
    lins = [lin for lin in spec.linears if lin.layer is not None and lin.quantized and lin.short in targets]
    widest_in, widest_out = max(lin.in_features for lin in lins), max(lin.out_features for lin in lins)
    return rank * (widest_in + widest_out) * ITEMSIZE[adapter_dtype]


def optimizer_terms(tensors: list[tuple[int, int]], optimizer: str, device: str) -> tuple[int, int]:
    """(device bytes, host-backed bytes) of the optimizer state for these tensors."""
    dev = host = 0
    for n, size in tensors:
        d, h = optimizer_state_bytes(n, size, optimizer, device)
        dev, host = dev + d, host + h
    return dev + (optimizer_shared_bytes(optimizer) if tensors else 0), host


# ---------------------------------------------------------------------------- estimate


def estimate(model: str | ModelSpec = DEFAULT_MODEL, settings: Settings | None = None, **changes) -> Footprint:
    """Predict the memory of one QLoRA training step.

    Example::

        memory.estimate("llama-3.1-8b", seq_len=4096, rank=32)
        s = memory.Settings(seq_len=4096, micro_batch_size=2, loss="hf", device="cpu")
        memory.estimate(spec, s)                      # the same settings for many models
        memory.estimate(spec, s, rank=64)             # ... with one change

    Args:
        model: catalog name, config.json/model folder path, or a :class:`ModelSpec`.
        settings: a :class:`memory.Settings` (its fields are documented there);
            default ``memory.Settings()``: seq 2048, micro-batch 1, rank 16 on all
            linears, paged 8-bit AdamW, checkpointing, chunked loss, on CUDA.
            ``seq_len``, ``micro_batch_size`` and ``rank`` must be numbers here;
            ``effective_batch_size`` and ``margin`` only matter to :func:`memory.plan`.
        **changes: fields of :class:`memory.Settings` to change
            (applied with :func:`dataclasses.replace`).

    Returns:
        A :class:`Footprint`. Never prints.

    Raises:
        InputError: an unknown setting or invalid value, ``"auto"`` for seq_len,
            micro_batch_size or rank, an unknown model, ``sdpa`` on an
            architecture without it, targets matching nothing.
    """
    spec = _spec(model)
    s = with_changes(settings, changes).without_auto()
    return _estimate(spec, s)


@functools.lru_cache(maxsize=256)
def _resolved(spec: ModelSpec, attn: str, targets: str | tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(attention implementation, in-layer target names): what the settings mean for this model."""
    return resolve_attn(spec, attn), resolve_targets(spec, targets)


@functools.lru_cache(maxsize=1024)
def _persistent(
    spec: ModelSpec, shorts: tuple[str, ...], rank: int, dora: bool, adapter_dtype: str, optimizer: str,
    quant_type: str, blocksize: int, double_quant: bool, device: str, vera: bool = False, adalora: bool = False,
) -> tuple[MappingProxyType, int, int, int]:
    """What does not depend on batch or sequence.

    Returns:
        (persistent terms, host-backed optimizer state bytes, optimizer step temporaries, LoRA elements).
    """
    persistent = weight_terms(spec, quant_type, blocksize, double_quant, device)
    tensors = adapter_tensors(spec, shorts, rank, dora, adapter_dtype, vera, adalora)
    persistent["lora_params"] = sum(n * size for n, size in tensors)
    if adalora:  # the sensitivity and uncertainty EMAs, float32, one each per adapter entry
        persistent["adalora_state"] = 8 * sum(n for n, _ in tensors)
    if vera:  # frozen: no gradient, no optimizer state
        persistent["vera_matrices"] = vera_matrix_bytes(spec, shorts, rank, adapter_dtype)
    state_dev, state_host = optimizer_terms(tensors, optimizer, device)
    persistent["optimizer_state"] = state_dev
    step_tmp = optimizer_step_temporaries(tensors, optimizer, device)
    return MappingProxyType(persistent), state_host, step_tmp, sum(n for n, _ in tensors)


def _estimate(spec: ModelSpec, s: Settings) -> Footprint:
    """:func:`estimate` after validation."""
    attn, shorts = _resolved(spec, s.attn, s.targets)
    batch, seq_len, rank, device = s.micro_batch_size, s.seq_len, s.rank, s.device
    checkpointing = s.gradient_checkpointing
    persistent, state_host, step_tmp, lora_elements = _persistent(
        spec, shorts, rank, s.dora, s.adapter_dtype, s.optimizer, s.quant_type, s.blocksize, s.double_quant, device,
        s.vera, s.adalora,
    )

    mlp, norms = s.tiled_mlp is True, s.tiled_norms is True  # estimate reads "auto" as off; memory.plan decides
    tile = min(s.tile_tokens, batch * seq_len) if mlp or norms else 0
    profile = body_profile(
        spec, shorts, s.dropout, s.dora, s.adapter_dtype, attn, checkpointing, device, s.quant_type, s.blocksize,
        s.double_quant, probe_window(spec, seq_len), mlp, norms, s.vera, s.adalora,
    )
    if s.loss == "hf":
        head = hf_head_segment(spec, batch, seq_len, attn, device)
    else:
        softcap = _facts(spec).get("final_logit_softcapping") is not None
        head = chunked_loss_segment(batch, seq_len, spec.hidden_size, spec.vocab_size, s.loss_chunk_tokens, softcap)
    peaks = profile.phases(batch, seq_len, rank, spec.layer_types, head, tile)

    candidates: dict[str, dict[str, int]] = {}
    for phase in ("forward", "loss", "backward"):
        candidates[phase] = dict(persistent, **_terms(getattr(peaks, phase)))
    if s.packed and attn == "sdpa" and _masks_packing(spec, seq_len):
        held, per_call = block_mask_bytes(batch, seq_len)
        for phase, extra in (("forward", held + per_call), ("loss", held), ("backward", held + per_call)):
            candidates[phase]["block_mask"] = extra
    offloaded = pinned = 0
    if s.offload_activations and checkpointing and device == "cuda":
        # qlora.train.offload keeps two layers' inputs on the device (the one being
        # recomputed and the one being prefetched); the rest (bf16 hidden
        # states, 2*b*s*h bytes per layer) wait in pinned host memory.
        per_layer = 2 * batch * seq_len * spec.hidden_size
        offloaded = max(0, len(spec.layer_types) - 2) * per_layer
        for phase in ("forward", "loss", "backward"):
            kept = candidates[phase].get("saved_activations", 0)
            candidates[phase]["saved_activations"] = max(0, kept - offloaded)
        pinned = len(spec.layer_types) * per_layer
    candidates["optimizer"] = dict(persistent, **_terms(peaks.after), optimizer_step=step_tmp)
    if s.init in INIT_TRANSIENT:  # at load time: the model and adapter, no optimizer state yet
        largest = max(lin.numel for lin in spec.linears if lin.quantized and lin.short in shorts)
        weights = {k: v for k, v in persistent.items() if k != "optimizer_state"}
        candidates["init"] = dict(weights, init_transient=init_transient_bytes(s.init, largest))
    candidates, offloaded_params = per_gpu(candidates, spec, s, shorts)
    phases = {p: sum(v.values()) for p, v in candidates.items()}
    peak_phase = max(phases, key=phases.get)
    breakdown = {k: candidates[peak_phase].get(k, 0) for k in TERMS}
    tensor_peak = phases[peak_phase]
    on_gpu = device == "cuda"
    return Footprint(
        model=spec.name, device=device, seq_len=seq_len, micro_batch_size=batch, rank=rank, targets=shorts,
        dropout=s.dropout, dora=s.dora, vera=s.vera, adalora=s.adalora, adapter_dtype=s.adapter_dtype,
        optimizer=s.optimizer,
        gradient_checkpointing=checkpointing, attn=attn, loss=s.loss,
        loss_chunk_tokens=s.loss_chunk_tokens if s.loss == "chunked" else None,
        breakdown=breakdown, phases=phases, peak_phase=peak_phase, tensor_peak_bytes=tensor_peak,
        cuda_context_bytes=s.cuda_context_bytes if on_gpu else 0,
        allocator_reserve_bytes=int(s.allocator_reserve * tensor_peak) if on_gpu else 0,
        quantized_params=spec.quantized_params, lora_params=lora_elements,
        nf4_bits_per_param=(
            16.0 if s.quant_type == NO_QUANT else bits_per_param(s.quant_type, s.blocksize, s.double_quant)
        ),
        offload_activations=bool(offloaded), quant_type=s.quant_type, tiled_mlp=mlp, tiled_norms=norms,
        tile_tokens=tile or None, gpus=s.gpus, strategy=strategy_of(s),
        offload_params=s.offload_params is True,
        host=host_memory(spec, device, pinned, state_host, tensor_peak, offloaded_params),
    )


def _masks_packing(spec: ModelSpec, seq_len: int) -> bool:
    """Whether packed rows add a block mask the unpacked dry runs lack: not when every layer slides and the
    sequence reaches the window (that mask exists unpacked too, and is in the profile: ``probe_window``)."""
    types = set(spec.layer_types)
    # a window with no layer typed "sliding_attention" (Mistral, Phi-3) is every layer's window
    every_layer_slides = spec.sliding_window is not None and (types == {"sliding_attention"}
                                                              or "sliding_attention" not in types)
    return not (every_layer_slides and seq_len >= spec.sliding_window)


@functools.lru_cache(maxsize=256)
def _facts(spec: ModelSpec) -> dict:
    return spec.config  # parsed once per spec, not per estimate (read-only here)


def _terms(vec) -> dict[str, int]:
    out: dict[str, int] = {}
    for tag, value in zip(TAGS, vec):
        term = _TAG_TERM[tag]
        out[term] = out.get(term, 0) + value
    return out
