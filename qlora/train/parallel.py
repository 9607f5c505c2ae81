"""Training on N processes: torch.distributed as ``torchrun`` starts it, with DDP or FSDP2.

``torchrun --nproc-per-node N -m qlora.cli train RECIPE.yaml`` starts N copies
of the trainer. Each reads its rank from the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) and joins one
process group (:func:`init_world`: NCCL on CUDA, gloo on the CPU, with a
timeout on every collective, so a dead or stuck rank fails the run instead
of hanging it). Nothing here is a communication layer of its own: the two
strategies are PyTorch's.

* ``ddp`` (:class:`torch.nn.parallel.DistributedDataParallel`): every rank
  holds the whole NF4 base and adapter; backward all-reduces the LoRA
  gradients. ``forward_sync_buffers=False`` and ``init_sync=False``: the
  4-bit codes are buffers every rank read from the same files, and syncing
  them would move the whole base each step (or once, at start); the adapter
  starts equal everywhere because every rank seeds alike (checked by
  :func:`check_same` on the recipe).
* ``fsdp`` (FSDP2, ``fully_shard``): each decoder layer, the input embedding
  and the output head are a unit whose parameters are split across ranks
  and all-gathered just before they are used (then freed again; a tied
  embedding and head stay with the outermost unit, gathered all step). The 4-bit
  codes and their scales become frozen parameters first
  (:meth:`quant.NF4Linear.make_shardable`), so each rank holds about 1/N of
  the packed base, and of the adapter and its optimizer state.

Both see the step as one module call, :class:`StepModule` (micro-batch ->
summed loss), so their forward hooks run whichever loss path the recipe
picks. The loss normalisation stays exact across ranks: each rank divides
its summed loss by the target count of the *global* step (every rank knows
it: the step's rows are a function of the step and the seed), and multiplies
by N because both engines average gradients over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from layers.tiling import decoder_layers
from memory.distributed import FSDP_OPTIMIZERS  # the planner's rule: bitsandbytes cannot step DTensors
from qlora.adapters.files import adapter_from_model, save_adapter
from qlora.lora.targets import linear_layers
from qlora.lora.vera import vera_projections
from qlora.train.loss import forward_loss
from quant.errors import InputError, choices
from quant.linear import NF4Linear

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes files and logs metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"Environment variable {name}={raw!r} is not an integer; torchrun sets it, so launch "
                         f"with torchrun (or unset it for a single process).") from None


def world_from_env() -> World:
    """The :class:`World` torchrun describes in the environment (one process when it says nothing)."""
    size, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the run "
                         f"(0 <= RANK < WORLD_SIZE); launch with torchrun.")
    return World(rank, size, local)


def init_world(device: torch.device, backend: str = "auto", timeout_s: int = 600) -> tuple[World, torch.device]:
    """Join the process group torchrun set up; one process joins nothing.

    Args:
        device: the device the recipe resolved to (``cuda`` becomes ``cuda:LOCAL_RANK``).
        backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``nccl`` or ``gloo``.
        timeout_s: how long a collective may wait for the other ranks before it fails.

    Returns:
        ``(world, device)``: this rank's device.

    Raises:
        InputError: NCCL asked for on a CPU run, or more ranks on this node than it has GPUs.
    """
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if world.local_rank >= n:
            raise InputError(
                f"Rank {world.rank} has LOCAL_RANK {world.local_rank}, but this node has {n} CUDA GPU(s): "
                f"--nproc-per-node must be at most {n} for a CUDA run (one process per GPU)."
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    name = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if name == "nccl" and device.type != "cuda":
        raise InputError(f"distributed.backend is 'nccl', but this run is on {device.type}; NCCL needs CUDA GPUs. "
                         f"Use backend auto or gloo on the CPU.")
    if not dist.is_initialized():
        dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d (local rank %d) on %s, backend %s, collective timeout %d s",
             world.rank, world.size, world.local_rank, device, name, timeout_s)
    return world, device


def close_world(world: World) -> None:
    """Leave the process group (a barrier first: gloo aborts if a peer tears down mid-operation)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_same(world: World, what: str, value: object) -> None:
    """Every rank must hold the same ``value`` (JSON-able): the recipe, the data, the model.

    Raises:
        InputError: some rank differs; names the ranks and ``what``.
    """
    if not world.distributed:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    seen = gather_objects(world, digest)
    odd = [r for r, d in enumerate(seen) if d != seen[0]]
    if odd:
        raise InputError(
            f"Rank(s) {', '.join(map(str, odd))} have a different {what} than rank 0. Every rank of a run must "
            f"start from the same recipe, data and model files: launch the same command with the same files on "
            f"every node."
        )


def all_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over ranks (float64 keeps a loss sum exact enough across many ranks)."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a stop signal seen by one rank stops all together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    """Wait for every rank (after rank 0 writes a checkpoint, before anyone moves on)."""
    if world.distributed:
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP2-sharded ``DTensor`` gathered (a collective: every rank must call), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_objects(world: World, obj: object) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


class StepModule(nn.Module):
    """One micro-batch's forward as a module call: ``(input_ids, position_ids, labels)`` -> summed loss.

    DDP and FSDP2 act through module calls (DDP's gradient hooks are armed in
    its ``forward``; FSDP2 all-gathers in forward pre-hooks), while the
    chunked loss reads the head's weight directly. Wrapping
    :func:`qlora.train.loss.forward_loss` in one module gives both engines a
    forward to hook. With the head sharded (FSDP2) it is gathered for the loss
    and freed after it: the fused loss computes its gradient in the forward,
    so backward never needs the head.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None, autocast_dtype: torch.dtype):
        super().__init__()
        self.model, self.chunk_tokens, self.autocast_dtype = model, chunk_tokens, autocast_dtype
        self._head_unit = None  # the FSDP2 unit holding the head's weight, when it is sharded apart

    def shard_head_with(self, unit: nn.Module) -> None:
        """The head's weight lives in its own FSDP2 unit ``unit``: gather it for the chunked loss."""
        object.__setattr__(self, "_head_unit", unit)  # a reference, not a submodule: no second registration

    def forward(self, input_ids, position_ids, labels, n_targets: int) -> torch.Tensor:
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        gather = self.chunk_tokens is not None and self._head_unit is not None
        if gather:  # the chunked loss reads head.weight without calling the head: gather it here
            self._head_unit.unshard()
        try:
            return forward_loss(self.model, batch, self.chunk_tokens, self.autocast_dtype, n_targets)[0]
        finally:
            if gather:
                self._head_unit.reshard()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = decoder_layers(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no decoder layers (model.layers) to shard with FSDP; "
                         f"use distributed.strategy: ddp.")
    return layers


def check_rows(world: World, n_rows: int, micro_batch_size: int) -> None:
    """Raises InputError when the data cannot give every rank one micro-batch of distinct rows per step."""
    if world.distributed and n_rows < world.size * micro_batch_size:
        raise InputError(
            f"The data has {n_rows} train rows, but {world.size} ranks with micro-batch {micro_batch_size} need "
            f"{world.size * micro_batch_size} per step (each rank its own micro-batch). Use fewer processes "
            f"(--nproc-per-node), a smaller micro_batch_size, or more data."
        )


def check_strategy(strategy: str, optimizer: str, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Raises InputError for an unknown strategy, or an optimizer or compute dtype FSDP2 cannot run with here."""
    if strategy not in STRATEGIES:
        raise InputError(f"Unknown distributed.strategy {strategy!r}; valid choices are {choices(STRATEGIES)}.")
    if strategy == "fsdp" and compute_dtype == torch.float16:
        raise InputError(
            "quant.compute_dtype is float16, which needs a gradient scaler whose overflow check spans every "
            "rank's shards; qlora's scaler sees one rank's. Use bfloat16 compute (GPUs from Ampere on), or "
            "distributed.strategy: ddp (every rank checks the same all-reduced gradients)."
        )
    if strategy == "fsdp" and optimizer not in FSDP_OPTIMIZERS:
        raise InputError(
            f"optimizer.name is {optimizer!r}, but distributed.strategy fsdp shards the adapter into DTensors, "
            f"which bitsandbytes' optimizers cannot step. Use optimizer.name: adamw with fsdp (its state is "
            f"sharded too: 1/N per rank), or distributed.strategy: ddp."
        )


class ParallelModel:
    """The trainable model as the step sees it on ``world``: one forward per micro-batch, gradients in sync.

    Args:
        model: the NF4 + LoRA model, fully built (checkpointing, tiling, a resumed adapter).
        world: this process's :class:`World`; one process wraps nothing.
        strategy: ``ddp`` or ``fsdp`` (see the module docstring; the caller checks it with
            :func:`check_strategy`); ignored on one process.
        chunk_tokens, autocast_dtype: the loss, as :func:`qlora.train.loss.forward_loss`.
        device: this rank's device (DDP's ``device_ids`` on CUDA); None for the CPU.
        offload_params: fsdp only: the shards live in host memory (pinned on CUDA).

    Raises:
        InputError: fsdp on a model without decoder layers (``model.layers``).
    """

    def __init__(self, model: nn.Module, world: World, strategy: str, chunk_tokens: int | None,
                 autocast_dtype: torch.dtype, device: torch.device | None = None, offload_params: bool = False):
        self.model, self.world = model, world
        self.strategy = strategy if world.distributed else "single"
        step = StepModule(model, chunk_tokens, autocast_dtype)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not beside them
            step = DistributedDataParallel(
                step, device_ids=[device.index] if device is not None and device.type == "cuda" else None,
                forward_sync_buffers=False, init_sync=False, gradient_as_bucket_view=True,
            )
        elif self.strategy == "fsdp":
            _fully_shard(model, step, offload_params, device is not None and device.type == "cuda")
        self.step = step

    def loss(self, batch: dict, n_targets: int) -> torch.Tensor:
        """Summed loss of one micro-batch (its forward through the engine's hooks)."""
        return self.step(batch["input_ids"], batch["position_ids"], batch["labels"], n_targets)

    @contextlib.contextmanager
    def accumulating(self, sync: bool):
        """Gradients of the backward inside are synced across ranks only when ``sync`` (the step's last one)."""
        if self.strategy == "ddp" and not sync:
            with self.step.no_sync():
                yield
        elif self.strategy == "fsdp":
            self.step.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    @contextlib.contextmanager
    def generating(self):
        """Run the plain model (generation, task scores): FSDP2's outermost unit gathered for the duration."""
        if self.strategy == "fsdp":
            self.step.unshard()
            try:
                yield self.model
            finally:
                self.step.reshard()
        else:
            yield self.model

    @property
    def loss_scale(self) -> int:
        """What each rank's loss is multiplied by: both engines average gradients over ranks, the step sums."""
        return self.world.size if self.world.distributed else 1


def unit_sharder(world: World, strategy: str, offload: bool, device: torch.device):
    """``shard(unit)`` for :func:`qlora.train.build.build_model`: FSDP2 shards each decoder layer as it loads.

    So a rank never holds more than one whole layer of the base, and a base larger than one GPU loads when
    its shards fit. None unless the run is fsdp on 2 or more ranks. ``offload``: ``offload_params``.
    """
    if not world.distributed or strategy != "fsdp":
        return None
    return functools.partial(_shard_unit, offload=offload, pin=device.type == "cuda")


def _shard_unit(unit: nn.Module, offload: bool, pin: bool) -> None:
    """One FSDP2 unit: its 4-bit codes and scales become frozen parameters (so they shard), then ``fully_shard``.

    ``offload``: the shards live in host memory (pinned when ``pin``), FSDP2's ``CPUOffloadPolicy``: the GPU
    holds only the gathered units, and the optimizer steps the host shards.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    for m in unit.modules():
        if isinstance(m, NF4Linear):
            m.make_shardable()
    fully_shard(unit, **({"offload_policy": CPUOffloadPolicy(pin_memory=pin)} if offload else {}))


def _fully_shard(model: nn.Module, root: StepModule, offload: bool, pin: bool) -> None:
    """FSDP2 units: each decoder layer (unless sharded as it loaded), the input embedding, the output head (one
    unit when tied), then the root."""
    from torch.distributed.fsdp import FSDPModule

    shard = functools.partial(_shard_unit, offload=offload, pin=pin)
    at_load = 0
    for layer in _decoder_layers(model):
        if isinstance(layer, FSDPModule):
            at_load += 1
        else:
            shard(layer)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        # tied: one parameter, so one unit, and the root's (FSDP2 keeps the root gathered from its forward
        # to the end of its backward, so the loss finds the head whole); costs the embedding whole all step
        log.info("fsdp: the tied embedding and head stay in the outermost unit, gathered for the whole step")
    else:
        shard(emb)
        if head is not None:
            shard(head)
            root.shard_head_with(head)
    shard(root)  # the rest: the final norm, any 4-bit linear outside the layers
    n = sum(isinstance(m, NF4Linear) for m in model.modules())
    log.info("fsdp: %d decoder layers (%d of them sharded as they loaded), the embedding and the head sharded over "
             "%d ranks (%d 4-bit linears hold their codes and scales as frozen sharded parameters); adapter and "
             "optimizer state sharded too; shards in %s (distributed.offload_params)", len(_decoder_layers(model)),
             at_load, dist.get_world_size(), n, "pinned host memory" if offload else "device memory")


def adapter_saver(model: nn.Module, model_dir: Path, initial=None, adalora: dict | None = None):
    """``save(par, folder)``: write the model's adapter in PEFT format into ``folder`` (None: write nothing).

    ``initial``: a PiSSA/OLoRA/LoftQ init's step-0 factors: the adapter is written for the original base
    (:func:`qlora.lora.inits.to_original_base`). ``adalora``: an AdaLoRA run's schedule fields (its config).

    Made before any sharding (the linear names and the base path are read then). Under FSDP2 every rank
    must call it, because the adapter's shards are gathered first; only rank 0 passes a folder.
    """
    names = list(linear_layers(model))
    base = str(Path(model_dir).resolve())  # the folder actually trained on, so other tools can find the base

    # one process only for these two (the planner refuses them on several): written from the live model
    whole = vera_projections(model) is not None or adalora is not None

    def save(par: ParallelModel, folder: Path | None) -> None:
        if whole:
            if folder is not None:
                save_adapter(par.model, folder, base, linear_names=names, adalora=adalora)
            return
        adapter = adapter_from_model(par.model)
        if par.strategy == "fsdp":
            adapter.modules = {
                name: dataclasses.replace(
                    m, lora_A=full_tensor(m.lora_A), lora_B=full_tensor(m.lora_B),
                    magnitude=None if m.magnitude is None else full_tensor(m.magnitude))
                for name, m in adapter.modules.items()
            }
        if folder is not None:
            save_adapter(par.model, folder, base, initial, adapter=adapter, linear_names=names)

    return save


def optimizer_state(par: ParallelModel, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on rank 0 (FSDP2: gathered from the shards, keyed by parameter name).

    Under FSDP2 every rank must call it (a collective). One process and DDP return ``opt.state_dict()``
    (DDP's replicas hold the same state).
    """
    if par.strategy != "fsdp":
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(par.step, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(par: ParallelModel, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load what :func:`optimizer_state` returned (every rank read the same checkpoint file).

    Raises:
        InputError: a checkpoint written under another strategy (its state is keyed differently).
    """
    keyed_by_name = any(isinstance(k, str) for k in state.get("state", {}))
    if keyed_by_name != (par.strategy == "fsdp"):
        raise InputError(
            f"The checkpoint's optimizer state was written {'under fsdp' if keyed_by_name else 'without fsdp'}, "
            f"but this run uses {par.strategy if par.strategy != 'single' else 'one process'}; resume it with the "
            f"strategy that wrote it (distributed.strategy), or start afresh in a new output_dir."
        )
    if par.strategy != "fsdp":
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(par.step, opt, state, options=StateDictOptions(full_state_dict=True))
