"""The footprint of one QLoRA training step: peak = max over phases of persistent + phase terms.

Persistent (alive all step, exact from shapes, :mod:`memory.terms`):
    ``nf4_weights``            4-bit codes + scales (+ code tables) of every quantized linear
    ``embeddings_16bit``       input embeddings (a tied head is counted here, once)
    ``lm_head_16bit``          an untied output head (never quantized)
    ``norms_biases_buffers``   norm weights, linear biases, RoPE buffers
    ``lora_params``            A (r, in), B (out, r) [, DoRA m (out,)] in the adapter dtype
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
from collections.abc import Sequence
from dataclasses import dataclass

from quant import bits_per_param
from quant.blockwise import check_args
from quant.errors import InputError, choices

from .catalog import DEFAULT_MODEL
from .probe import TAGS
from .profile import body_profile, hf_head_segment
from .spec import ModelSpec, build_config, causal_lm_class, load_spec
from .targets import resolve_targets
from .terms import (
    ITEMSIZE,
    OPTIMIZERS,
    chunked_loss_segment,
    lora_tensors,
    nested_table_bytes,
    nf4_bytes,
    optimizer_shared_bytes,
    optimizer_state_bytes,
    optimizer_step_temporaries,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
ATTN = ("auto", "sdpa", "eager")
LOSSES = ("hf", "chunked")
DEVICES = ("cuda", "cpu")
# Defaults for the terms outside the tensor peak. The CUDA context is 0.3-0.6 GiB
# with lazy module loading (PyTorch/NVIDIA docs); the allocator's cache and
# fragmentation are a fraction of the peak. Both are assumptions until
# bench/memory_accuracy.py measures them on a GPU (it reports reserved/allocated).
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_RESERVE = 0.05

TERMS = {
    "nf4_weights": "4-bit weights + scales",
    "embeddings_16bit": "embeddings (16-bit)",
    "lm_head_16bit": "lm_head (16-bit)",
    "norms_biases_buffers": "norms, biases, buffers",
    "lora_params": "LoRA parameters",
    "optimizer_state": "optimizer state (device)",
    "inputs": "input ids + labels",
    "saved_activations": "activations kept for backward",
    "logits_loss": "final norm, logits + loss",
    "layer_backward": "layer recompute + backward",
    "dequantized_weight": "dequantized weight (transient)",
    "lora_grads": "LoRA gradients",
    "optimizer_step": "optimizer step temporaries",
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
        host_bytes: paged optimizer state living in host-backed unified memory,
            plus offloaded layer inputs in pinned host memory.
        cuda_context_bytes, allocator_reserve_bytes: on top of the tensor peak
            on a GPU (0 for ``device='cpu'``).
        quantized_params, lora_params: element counts.
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
    host_bytes: int
    cuda_context_bytes: int
    allocator_reserve_bytes: int
    quantized_params: int
    lora_params: int
    nf4_bits_per_param: float
    offload_activations: bool = False

    @property
    def device_total_bytes(self) -> int:
        """Tensor peak + CUDA context + allocator reserve: what the device must hold."""
        return self.tensor_peak_bytes + self.cuda_context_bytes + self.allocator_reserve_bytes


# ---------------------------------------------------------------------------- validation


def positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return value


def _one_of(value, valid, what: str):
    if value not in valid:
        raise InputError(f"Unknown {what} {value!r}; valid choices are {choices(valid)}.")
    return value


def resolve_attn(spec: ModelSpec, attn: str) -> str:
    """``auto`` -> ``sdpa`` where the architecture supports it, else ``eager``.

    Raises:
        InputError: ``sdpa`` requested for an architecture without it (Gemma-2).
    """
    _one_of(attn, ATTN, "attention implementation")
    cls = _model_class(spec)
    has_sdpa = bool(getattr(cls, "_supports_sdpa", False))
    if attn == "auto":
        return "sdpa" if has_sdpa else "eager"
    if attn == "sdpa" and not has_sdpa:
        raise InputError(
            f"{spec.name} ({cls.__name__}) has no sdpa attention in the installed transformers; use attn 'eager' or 'auto'."
        )
    return attn


@functools.lru_cache(maxsize=64)
def _model_class(spec: ModelSpec):
    return causal_lm_class(build_config(spec.config))


def _spec(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else load_spec(model)


# ---------------------------------------------------------------------------- persistent terms


def weight_terms(
    spec: ModelSpec, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, device: str = "cuda"
) -> dict[str, int]:
    """Bytes of the frozen model on the device (16-bit parts in bf16)."""
    quantized = [lin for lin in spec.linears if lin.quantized]
    nf4 = sum(nf4_bytes(lin.in_features, lin.out_features, quant_type, blocksize, double_quant) for lin in quantized)
    nf4 += nested_table_bytes(len(quantized), double_quant, device)
    g = spec.frozen_16bit
    return {
        "nf4_weights": nf4,
        "embeddings_16bit": 2 * g["embeddings"],
        "lm_head_16bit": 2 * g["lm_head"],
        "norms_biases_buffers": 2 * (g["norms"] + g["linear biases"] + g["other"]) + spec.buffer_bytes,
    }


def adapter_tensors(spec: ModelSpec, targets: tuple[str, ...], rank: int, dora: bool, adapter_dtype: str) -> list[tuple[int, int]]:
    """(elements, bytes per element) of every trainable adapter tensor."""
    out: list[tuple[int, int]] = []
    for lin in spec.linears:
        if lin.layer is not None and lin.quantized and lin.short in targets:
            out.extend(lora_tensors(lin.in_features, lin.out_features, rank, dora, ITEMSIZE[adapter_dtype]))
    return out


def optimizer_terms(tensors: list[tuple[int, int]], optimizer: str, device: str) -> tuple[int, int]:
    """(device bytes, host-backed bytes) of the optimizer state for these tensors."""
    dev = host = 0
    for n, size in tensors:
        d, h = optimizer_state_bytes(n, size, optimizer, device)
        dev, host = dev + d, host + h
    return dev + (optimizer_shared_bytes(optimizer) if tensors else 0), host


# ---------------------------------------------------------------------------- estimate


def estimate(
    model: str | ModelSpec = DEFAULT_MODEL,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    rank: int = 16,
    targets: str | Sequence[str] = "all-linear",
    dropout: float = 0.0,
    dora: bool = False,
    adapter_dtype: str = "bfloat16",
    optimizer: str = "paged_adamw_8bit",
    gradient_checkpointing: bool = True,
    attn: str = "auto",
    loss: str = "chunked",
    loss_chunk_tokens: int = 1024,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    device: str = "cuda",
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES,
    allocator_reserve: float = ALLOCATOR_RESERVE,
    offload_activations: bool = False,
) -> Footprint:
    """Predict the memory of one QLoRA training step.

    Args:
        model: catalog name, config.json/model folder path, or a ModelSpec.
        seq_len: tokens per sequence (>= 2). micro_batch_size: sequences per step.
        rank: LoRA rank. targets: preset, names or regex (see :mod:`memory.targets`).
        dropout: LoRA dropout. dora: DoRA magnitudes. adapter_dtype: bfloat16/float16/float32.
        optimizer: adamw (torch), adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (bitsandbytes).
        gradient_checkpointing: one non-reentrant checkpoint per decoder layer.
        attn: sdpa, eager, or auto (sdpa where the architecture has it).
        loss: ``chunked`` (``qlora.train.loss.causal_lm_loss`` with ``loss_chunk_tokens``
            rows per chunk; the trainer's default, ``chunked_loss: true``) or
            ``hf`` (transformers' loss on full fp32 logits).
        quant_type, blocksize, double_quant: the 4-bit format.
        device: ``cuda`` (CUDA kernels; context and reserve added) or ``cpu``
            (CPU kernels; what :class:`memory.tracker.LiveTensorTracker` measures).
        cuda_context_bytes, allocator_reserve: overheads outside the tensor
            peak; the reserve is a fraction of the tensor peak.
        offload_activations: checkpointed layer inputs wait in pinned host
            memory (``qlora.train.offload``); on CUDA all but two layers' inputs
            leave the device and are counted in ``host_bytes``. On CPU there
            is nothing to move, so nothing changes.

    Returns:
        A :class:`Footprint`. Never prints.

    Raises:
        InputError: any invalid argument, unknown model, targets matching nothing.
    """
    spec = _spec(model)
    seq_len = positive_int(seq_len, "seq_len", 2)
    micro_batch_size = positive_int(micro_batch_size, "micro_batch_size")
    rank = positive_int(rank, "rank")
    loss_chunk_tokens = positive_int(loss_chunk_tokens, "loss_chunk_tokens")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}.")
    _one_of(adapter_dtype, tuple(ITEMSIZE), "adapter dtype")
    _one_of(optimizer, OPTIMIZERS, "optimizer")
    _one_of(loss, LOSSES, "loss")
    _one_of(device, DEVICES, "device")
    check_args(quant_type, blocksize)
    if not 0.0 <= allocator_reserve < 1.0:
        raise InputError(f"allocator_reserve is a fraction of the peak in [0, 1), got {allocator_reserve!r}.")
    attn = resolve_attn(spec, attn)
    shorts = resolve_targets(spec, targets)
    return _estimate(
        spec, seq_len, micro_batch_size, rank, shorts, float(dropout), bool(dora), adapter_dtype, optimizer,
        bool(gradient_checkpointing), attn, loss, loss_chunk_tokens, quant_type, blocksize, bool(double_quant),
        device, cuda_context_bytes, allocator_reserve, bool(offload_activations),
    )


def _estimate(
    spec, seq_len, batch, rank, shorts, dropout, dora, adapter_dtype, optimizer, checkpointing, attn, loss,
    chunk, quant_type, blocksize, double_quant, device, context, reserve, offload=False,
) -> Footprint:
    """:func:`estimate` after validation."""
    persistent = weight_terms(spec, quant_type, blocksize, double_quant, device)
    tensors = adapter_tensors(spec, shorts, rank, dora, adapter_dtype)
    persistent["lora_params"] = sum(n * size for n, size in tensors)
    state_dev, state_host = optimizer_terms(tensors, optimizer, device)
    persistent["optimizer_state"] = state_dev

    profile = body_profile(
        spec, shorts, dropout, dora, adapter_dtype, attn, checkpointing, device, quant_type, blocksize, double_quant
    )
    if loss == "hf":
        head = hf_head_segment(spec, batch, seq_len, attn, device)
    else:
        softcap = spec.config.get("final_logit_softcapping") is not None
        head = chunked_loss_segment(batch, seq_len, spec.hidden_size, spec.vocab_size, chunk, softcap)
    peaks = profile.phases(batch, seq_len, rank, spec.layer_types, head)

    candidates: dict[str, dict[str, int]] = {}
    for phase in ("forward", "loss", "backward"):
        candidates[phase] = dict(persistent, **_terms(getattr(peaks, phase)))
    offloaded = 0
    if offload and checkpointing and device == "cuda":
        # qlora.train.offload keeps two layers' inputs on the device (the one being
        # recomputed and the one being prefetched); the rest (bf16 hidden
        # states, 2*b*s*h bytes per layer) wait in pinned host memory.
        per_layer = 2 * batch * seq_len * spec.hidden_size
        offloaded = max(0, len(spec.layer_types) - 2) * per_layer
        for phase in ("forward", "loss", "backward"):
            kept = candidates[phase].get("saved_activations", 0)
            candidates[phase]["saved_activations"] = max(0, kept - offloaded)
        state_host += len(spec.layer_types) * per_layer
    step_tmp = optimizer_step_temporaries(tensors, optimizer, device)
    candidates["optimizer"] = dict(persistent, **_terms(peaks.after), optimizer_step=step_tmp)
    phases = {p: sum(v.values()) for p, v in candidates.items()}
    peak_phase = max(phases, key=phases.get)
    breakdown = {k: candidates[peak_phase].get(k, 0) for k in TERMS}
    tensor_peak = phases[peak_phase]
    on_gpu = device == "cuda"
    return Footprint(
        model=spec.name, device=device, seq_len=seq_len, micro_batch_size=batch, rank=rank, targets=shorts,
        dropout=dropout, dora=dora, adapter_dtype=adapter_dtype, optimizer=optimizer,
        gradient_checkpointing=checkpointing, attn=attn, loss=loss, loss_chunk_tokens=chunk if loss == "chunked" else None,
        breakdown=breakdown, phases=phases, peak_phase=peak_phase, tensor_peak_bytes=tensor_peak,
        host_bytes=state_host, cuda_context_bytes=context if on_gpu else 0,
        allocator_reserve_bytes=int(reserve * tensor_peak) if on_gpu else 0,
        quantized_params=spec.quantized_params, lora_params=sum(n for n, _ in tensors),
        nf4_bits_per_param=bits_per_param(quant_type, blocksize, double_quant),
        offload_activations=bool(offloaded),
    )


def _terms(vec) -> dict[str, int]:
    out: dict[str, int] = {}
    for tag, value in zip(TAGS, vec.tolist()):
        term = _TAG_TERM[tag]
        out[term] = out.get(term, 0) + int(round(value))
    return out
