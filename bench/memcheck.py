"""Measure a real QLoRA training step's memory and compare it with the planner.

The step is the trainer's: a causal LM (random weights: their values do not
change memory) -> ``quant.quantize_model`` -> ``apply_lora`` -> transformers'
non-reentrant activation checkpointing -> forward with labels -> backward
-> optimizer step -> ``zero_grad(set_to_none=True)``. :func:`train_step` runs
that step through the trainer's own ``qlora.train.step.accumulate_gradients``.

This harness uses the trainer, so it cannot live in ``memory`` (``memory``
never imports ``qlora``): it is a ``bench/`` module, run by
``bench/memory_accuracy.py`` and imported by the tests as ``memcheck``
(pytest's ``pythonpath = ["bench"]``). Nothing in the packages imports it.

Measurement starts at step 2 (optimizer state is created lazily in step 1):

* CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over
  step 2 after ``reset_peak_memory_stats``; the prediction's tensor peak is
  compared with the allocated figure.
* CPU (and any device): :class:`memory.tracker.LiveTensorTracker` counts the
  bytes of every live tensor storage during step 2, starting from the
  parameters, buffers, optimizer state and inputs that exist when it begins.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

import memory
from layers.tiling import tile_mlps, tile_norms
from memory.tracker import LiveTensorTracker
from qlora.lora.adalora import AdaLoRASchedule, RankAllocator
from qlora.lora.surgery import apply_lora, lora_parameters
from qlora.lora.vera import apply_vera
from qlora.train.optim import build_optimizer
from qlora.train.setup import enable_checkpointing
from qlora.train.step import accumulate_gradients
from quant import quantize_model
from quant.errors import InputError, choices
from quant.formats import NO_QUANT

log = logging.getLogger(__name__)

LOSSES = ("hf", "chunked")


def random_qlora_model(
    config: dict,
    device: str = "cpu",
    targets: str = "all-linear",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    dora: bool = False,
    adapter_dtype: str = "bfloat16",
    gradient_checkpointing: bool = True,
    attn: str = "sdpa",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    seed: int = 0,
    tiled_mlp: bool = False,
    tiled_norms: bool = False,
    tile_tokens: int = 4096,
    vera: bool = False,
    delta_ratio: float | None = None,
    adalora: bool = False,
) -> nn.Module:
    """A trainable QLoRA model with random weights, built from config.json facts.

    The 16-bit model is created on ``device`` (bf16), its linears are
    quantized one at a time (the 16-bit copy of each is freed as it goes;
    ``quant_type="none"`` keeps them 16-bit),
    LoRA (VeRA with ``vera``, Delta-LoRA with ``delta_ratio``) wraps ``targets``, and every decoder layer
    is checkpointed; with
    ``tiled_mlp`` / ``tiled_norms`` every MLP / norm runs in tiles of ``tile_tokens`` tokens (the trainer's calls).

    Raises:
        InputError: bad config, targets, rank or dtype.
    """
    from memory.meta import build_config, causal_lm_class

    torch.manual_seed(seed)
    cfg = build_config(config)
    cls = causal_lm_class(cfg)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.config.use_cache = False
    if quant_type != NO_QUANT:  # none: the bf16 linears stay as built (plain LoRA, what the loader gives)
        quantize_model(model, quant_type, blocksize, double_quant, torch.bfloat16)
    if vera:
        apply_vera(model, targets, rank, dropout=dropout, dtype=adapter_dtype)
    else:
        apply_lora(model, targets, rank, alpha, dropout, use_dora=dora, dtype=adapter_dtype, delta_ratio=delta_ratio,
                   adalora=adalora)
    if gradient_checkpointing:
        enable_checkpointing(model)  # the trainer's call: non-reentrant, one checkpoint per layer
    if tiled_mlp:
        tile_mlps(model, tile_tokens)
    if tiled_norms:
        tile_norms(model, tile_tokens)
    model.train()
    return model


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-4) -> torch.optim.Optimizer:
    """The trainer's optimizer over the model's adapter parameters."""
    return build_optimizer([{"params": lora_parameters(model)}], name, lr=lr)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "hf",
    chunk_tokens: int | None = 1024,
    allocator=None,
    step: int = 0,
    packed: bool = False,
) -> float:
    """One optimizer step on one micro-batch; returns the loss value.

    Args:
        input_ids, labels: int64 ``(batch, seq)``; labels ``-100`` where no loss.
        loss: ``'hf'`` -- transformers' causal-LM loss (``model(labels=...)``,
            full fp32 logits); ``'chunked'`` -- :func:`qlora.train.loss.causal_lm_loss`
            on the final hidden states, ``chunk_tokens`` rows at a time.

    Runs :func:`qlora.train.step.accumulate_gradients` (the trainer's step, under
    its bf16 autocast) on one micro-batch; gradients are set to None after
    the step (so they are allocated afresh by the next backward). ``allocator``: AdaLoRA's
    :class:`qlora.lora.adalora.RankAllocator`, run as the trainer runs it (its penalty's backward, then
    its ``step(step)`` after the optimizer's). ``packed``: each row holds two examples (positions restart
    halfway), as a packed row does, so transformers builds its dense block mask.

    Raises:
        InputError: unknown ``loss``.
    """
    if loss not in LOSSES:
        raise InputError(f"Unknown loss {loss!r}; valid choices are {choices(LOSSES)}.")
    # The trainer's own forward/backward (qlora.train.loop), so what is measured is what trains.
    n = input_ids.shape[1]
    positions = torch.arange(n, device=input_ids.device)
    if packed:
        positions = torch.cat([positions[: n // 2], positions[: n - n // 2]])
    positions = positions.expand_as(input_ids)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    out = float(accumulate_gradients(model, [batch], chunk_tokens if loss == "chunked" else None, torch.bfloat16))
    if allocator is not None:
        allocator.orth_backward()
    optimizer.step()
    if allocator is not None:
        allocator.step(step)
    optimizer.zero_grad(set_to_none=True)
    return out


@dataclass(frozen=True)
class Measurement:
    """Peak memory of one training step (step 2 or later).

    Attributes:
        device: ``'cpu'``, ``'cuda'``...
        peak_bytes: CUDA ``max_memory_allocated``, or the tracker's peak of
            live tensor bytes elsewhere.
        reserved_bytes: CUDA ``max_memory_reserved`` (None off CUDA).
        start_bytes: bytes alive when the measured step began.
        loss: the measured step's loss (finite, as a sanity check).
    """

    device: str
    peak_bytes: int
    reserved_bytes: int | None
    start_bytes: int
    loss: float


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for state in optimizer.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: int,
    seq: int,
    loss: str = "hf",
    chunk_tokens: int | None = 1024,
    warmup_steps: int = 1,
    allocator=None,
    packed: bool = False,
) -> Measurement:
    """Run ``warmup_steps`` steps, then measure the peak of the next one.

    Inputs are random token ids with every position labelled (the most
    loss tokens a batch of this shape can have).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def batch_tensors():
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        return ids, ids.clone()

    for i in range(warmup_steps):
        train_step(model, optimizer, *batch_tensors(), loss=loss, chunk_tokens=chunk_tokens, allocator=allocator,
                   step=i, packed=packed)
    ids, labels = batch_tensors()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        value = train_step(model, optimizer, ids, labels, loss=loss, chunk_tokens=chunk_tokens, allocator=allocator,
                           step=warmup_steps, packed=packed)
        torch.cuda.synchronize(device)
        return Measurement(
            "cuda", torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), start, value
        )
    tracker = LiveTensorTracker(device.type)
    with tracker:
        tracker.track(model.parameters())
        tracker.track(model.buffers())
        tracker.track(_optimizer_tensors(optimizer))
        tracker.track([ids, labels])
        if allocator is not None:
            tracker.track([*allocator.avg_ipt.values(), *allocator.avg_unc.values()])
        start = tracker.current
        value = train_step(model, optimizer, ids, labels, loss=loss, chunk_tokens=chunk_tokens, allocator=allocator,
                           step=warmup_steps, packed=packed)
    return Measurement(device.type, tracker.peak, None, start, value)


@dataclass(frozen=True)
class Check:
    """A prediction next to a measurement of the same configuration."""

    footprint: memory.Footprint
    measurement: Measurement

    @property
    def predicted_bytes(self) -> int:
        """The prediction's tensor peak (context and allocator reserve excluded)."""
        return self.footprint.tensor_peak_bytes

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_bytes - self.measurement.peak_bytes) / self.measurement.peak_bytes


def check(
    config: dict,
    batch: int,
    seq: int,
    rank: int = 16,
    targets: str = "all-linear",
    dropout: float = 0.0,
    dora: bool = False,
    adapter_dtype: str = "bfloat16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = True,
    attn: str = "auto",
    loss: str = "hf",
    chunk_tokens: int = 1024,
    device: str = "cpu",
    name: str = "custom",
    quant_type: str = "nf4",
    tiled_mlp: bool = False,
    tiled_norms: bool = False,
    tile_tokens: int = 4096,
    vera: bool = False,
    delta_ratio: float | None = None,
    adalora: bool = False,
    packed: bool = False,
) -> Check:
    """Predict with :func:`memory.estimate`, then build, run and measure the same configuration.

    ``delta_ratio``: run Delta-LoRA, which the planner plans as LoRA (the trainer's mapping, qlora.train.plan).
    ``packed``: rows of two examples each (see :func:`train_step`), planned with ``Settings(packed=True)``.

    Raises:
        InputError: invalid settings (as :func:`memory.estimate` and :func:`random_qlora_model`).
    """
    spec = memory.spec_from_config(config, name=name)
    settings = memory.Settings(
        seq_len=seq, micro_batch_size=batch, rank=rank, targets=targets, dropout=dropout, dora=dora,
        adapter_dtype=adapter_dtype, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
        attn=attn, loss=loss, loss_chunk_tokens=chunk_tokens, device="cuda" if device.startswith("cuda") else "cpu",
        quant_type=quant_type, tiled_mlp=tiled_mlp, tiled_norms=tiled_norms, tile_tokens=tile_tokens, vera=vera,
        adalora=adalora, packed=packed,
    )
    fp = memory.estimate(spec, settings)
    model = random_qlora_model(
        config, device, targets, rank, 2.0 * rank, dropout, dora, adapter_dtype, gradient_checkpointing, fp.attn,
        quant_type, tiled_mlp=tiled_mlp, tiled_norms=tiled_norms, tile_tokens=tile_tokens, vera=vera,
        delta_ratio=delta_ratio, adalora=adalora,
    )
    opt = make_optimizer(model, optimizer)
    # AdaLoRA: scoring every step, pruning from the second on (tinit 0, a long schedule)
    alloc = RankAllocator(model, AdaLoRASchedule(rank, max(1, rank // 2), 1000)) if adalora else None
    m = measure_step(model, opt, batch, seq, loss, chunk_tokens if loss == "chunked" else None, allocator=alloc,
                     packed=packed)
    log.info(
        "predicted %.2f MiB, measured %.2f MiB (%+.1f%%)",
        fp.tensor_peak_bytes / 2**20, m.peak_bytes / 2**20, 100 * (fp.tensor_peak_bytes - m.peak_bytes) / m.peak_bytes,
    )
    return Check(fp, m)


# ---------------------------------------------------------------------------- one rank of N (torchrun)


@contextlib.contextmanager
def fsdp_resizes_reported(tracker: LiveTensorTracker):
    """FSDP2 allocates and frees its gathered parameters with ``UntypedStorage.resize_``, which no dispatch
    mode sees: report each of those resizes to ``tracker`` (:meth:`LiveTensorTracker.note_resize`) meanwhile."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    originals = _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage

    def alloc(t):
        originals[0](t)
        tracker.note_resize(t)

    def free(t):
        originals[1](t)
        tracker.note_resize(t)

    _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = alloc, free, alloc
    try:
        yield
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = originals


@dataclass(frozen=True)
class RankCheck:
    """One rank's live tensor bytes next to the planner's per-GPU prediction.

    Attributes:
        at_rest: bytes of this rank's parameters, buffers and optimizer state between steps (local shards).
        predicted_at_rest: the planner's persistent terms (weights, embeddings, head, norms, LoRA, optimizer
            state); DDP's gradient buckets are left out on both sides (they live inside DDP's reducer).
        peak, predicted_peak: the step's peak of live tensors, and the planner's tensor peak.
        footprint: the planner's per-GPU prediction.
    """

    at_rest: int
    predicted_at_rest: int
    peak: int
    predicted_peak: int
    footprint: memory.Footprint


def check_rank(world, strategy: str, config: dict, batch: int, seq: int, rank: int = 8,
               chunk_tokens: int = 1024) -> RankCheck:
    """Measure one CPU training step of this rank (of ``world``) wrapped by ``ParallelModel`` (ddp or fsdp).

    Every rank of the process group must call it. The step is the trainer's
    (:func:`qlora.train.step.accumulate_gradients` with the chunked loss, AdamW), on a random
    QLoRA model built from ``config``; the first step creates the optimizer state, the second is measured.
    """
    from torch.distributed.tensor import DTensor

    from qlora.train.parallel import ParallelModel

    model = random_qlora_model(config, rank=rank)
    par = ParallelModel(model, world, strategy, chunk_tokens, torch.bfloat16)
    opt = make_optimizer(model, "adamw")  # after sharding: the optimizer holds the shards
    gen = torch.Generator().manual_seed(world.rank)

    def step() -> None:
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=gen)
        pos = torch.arange(seq).expand(batch, seq)
        accumulate_gradients(model, [{"input_ids": ids, "labels": ids.clone(), "position_ids": pos}], chunk_tokens,
                             torch.bfloat16, parallel=par)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    held = [t.to_local() if isinstance(t, DTensor) else t
            for t in [*model.parameters(), *model.buffers(), *_optimizer_tensors(opt)]]
    at_rest = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in held}.values())
    tracker = LiveTensorTracker("cpu")
    with tracker, fsdp_resizes_reported(tracker):
        tracker.track(held)
        step()
    spec = memory.spec_from_config(config, name="rank-check")
    fp = memory.estimate(spec, memory.Settings(
        seq_len=seq, micro_batch_size=batch, rank=rank, optimizer="adamw", device="cpu", gpus=world.size,
        strategy=strategy, loss_chunk_tokens=chunk_tokens))
    persistent = sum(fp.breakdown[k] for k in ("nf4_weights", "embeddings_16bit", "lm_head_16bit",
                                                "norms_biases_buffers", "lora_params", "optimizer_state"))
    return RankCheck(at_rest, persistent, tracker.peak, fp.tensor_peak_bytes, fp)


LOAD_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=16,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def check_load(world, folder, config: dict = LOAD_CONFIG, rank: int = 8) -> dict:
    """One rank's live tensor bytes at the peak of :func:`qlora.train.build.build_model`, whole and sharded.

    Rank 0 writes a bf16 checkpoint of ``config`` (random weights) into ``folder``; then every rank builds the
    QLoRA model twice: as one process does (the whole base on this rank), and with FSDP2 sharding each layer as
    it loads (:func:`qlora.train.parallel.unit_sharder`). Every rank of the process group must call it.

    Returns:
        ``{"whole": peak, "sharded": peak, "base": the whole base's 4-bit bytes, "predicted": the planner's
        phase "load" for the sharded build}``.
    """
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.train.build import build_model
    from qlora.train.parallel import unit_sharder
    from qlora.train.recipe import LoraConfig, QuantConfig
    from quant import NF4Linear

    if world.main:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**config)
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    dist.barrier()
    quant, lora = QuantConfig(compute_dtype="bfloat16"), LoraConfig(rank=rank, dtype="bfloat16")
    cpu = torch.device("cpu")
    quantize_model(nn.Sequential(nn.Linear(64, 64)))  # the 8-bit code table is built once per process
    got: dict[str, int] = {}
    for mode, shard in (("whole", None), ("sharded", unit_sharder(world, "fsdp", False, cpu))):
        torch.manual_seed(0)
        tracker = LiveTensorTracker("cpu")
        with tracker:
            model = build_model(folder, cpu, quant, lora, "bfloat16", shard_unit=shard).model
        got[mode] = tracker.peak
        if shard is None:
            got["base"] = sum(getattr(m, t).nbytes for m in model.modules() if isinstance(m, NF4Linear)
                              for t in NF4Linear.SHARDED)
        del model
    fp = memory.estimate(memory.spec_from_config(config, name="load-check"), memory.Settings(
        seq_len=64, micro_batch_size=1, rank=rank, optimizer="adamw", device="cpu", gpus=world.size,
        strategy="fsdp"))
    got["predicted"] = fp.phases["load"]
    return got
