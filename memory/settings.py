"""The choices of a run that decide its memory: one frozen dataclass, validated in one place.

:func:`memory.estimate`, :func:`memory.plan` and :func:`memory.sweep` take a
:class:`Settings` plus keyword changes to it (``estimate(spec, seq_len=4096,
rank=32)`` is ``estimate(spec, Settings(seq_len=4096, rank=32))``).
``qlora.train.plan.settings_from_recipe`` builds one from a recipe, and
``qlora plan`` generates its command-line flags from each field's
:class:`Flag` metadata, so a setting is named, documented and parsed here
only.

Every field is checked when a :class:`Settings` is made (also by
:func:`dataclasses.replace`); what needs the model (is ``sdpa`` available,
which linears do the targets select) is checked by :func:`memory.estimate`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quant.dtypes import ITEMSIZE
from quant.errors import InputError, choices
from quant.formats import check_base_format

from .terms import INITS, OPTIMIZERS

ATTN = ("auto", "sdpa", "eager")
LOSSES = ("hf", "chunked")
STRATEGIES = ("auto", "ddp", "fsdp")
DEVICES = ("cuda", "cpu")
MIB = 1 << 20
# Defaults for the terms outside the tensor peak. The CUDA context is 0.3-0.6 GiB
# with lazy module loading (PyTorch/NVIDIA docs); the allocator's cache and
# fragmentation are a fraction of the peak. Both are assumptions until
# bench/memory_accuracy.py measures them on a GPU (it reports reserved/allocated).
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_RESERVE = 0.05
MARGIN = 0.05


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the ``qlora plan`` command line.

    Attributes:
        name: the flag (``--seq-len``).
        help: what it means, without the default (the CLI appends it).
        metavar: the value's placeholder; None for a switch.
        parse: raw argparse value -> setting value, raising ``ValueError``
            on bad text; None for a switch, which stores ``const``.
        expects: what a valid value looks like, for the error message.
        const: the value a switch stores.
        nargs: argparse ``nargs`` (``"+"`` for lists, ``"?"`` for an optional value).
        implies: other settings a given flag also sets, as (field, value) pairs.
    """

    name: str
    help: str
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None
    expects: str = ""
    const: Any = None
    nargs: str | None = None
    implies: tuple[tuple[str, Any], ...] = ()


def _int_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


_SWITCH = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}


def _switch(text: str) -> bool | str:
    try:
        return _SWITCH[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None  # the CLI reports `expects`


def _targets(values: list[str]) -> str | tuple[str, ...]:
    return values[0] if len(values) == 1 else tuple(values)


def _opt(flag: str, help_: str, metavar: str | None = None, parse=None, expects: str = "", **kw) -> dict:
    return {"flag": Flag(flag, help_, metavar, parse, expects, **kw)}


_AUTO = "a positive integer or 'auto'"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every memory-relevant choice of a QLoRA run (frozen, hashable, keyword-only).

    Attributes:
        seq_len: tokens per sequence (>= 2), or ``"auto"`` (:func:`memory.plan` only).
        micro_batch_size: sequences per forward/backward, or ``"auto"`` (plan only).
        rank: LoRA rank, or ``"auto"`` (plan only).
        effective_batch_size: sequences per optimizer step (plan only).
        targets: preset, module names (a tuple) or regex (see :mod:`memory.targets`).
        dropout: LoRA dropout in [0, 1). dora: DoRA magnitudes. vera: VeRA instead of LoRA (shared frozen
            ``(r, max_in)`` and ``(max_out, r)`` matrices, trainable vectors ``r + out`` per layer; one GPU).
            adalora: AdaLoRA (E ``(r,)`` per layer and the allocator's two float32 EMAs per adapter entry;
            ``rank`` is the starting rank; one GPU).
        adapter_dtype: bfloat16, float16 or float32.
        optimizer: adamw (torch), adamw_8bit, paged_adamw_8bit or paged_adamw_32bit (bitsandbytes).
        gradient_checkpointing: one non-reentrant checkpoint per decoder layer.
        init: the LoRA init; ``pissa``, ``olora``, ``loftq`` and ``nonzero`` add an ``init`` phase (one
            layer's SVD/QR or residual at load time, :data:`memory.terms.INIT_TRANSIENT`).
        attn: sdpa, eager, or auto (sdpa where the architecture has it).
        loss: ``chunked`` (qlora's loss, ``loss_chunk_tokens`` rows per chunk;
            the trainer's default) or ``hf`` (transformers' loss on full fp32 logits).
        offload_activations: checkpointed layer inputs wait in pinned host memory.
        packed: rows pack several examples (the trainer's ``data.packing``, its default): under sdpa,
            transformers then builds a dense ``(b, 1, s, s)`` block mask (``block_mask``: about
            ``3·b·s²`` bytes at the peak). False plans one example per row (plain causal attention).
        tiled_mlp: every layer's MLP runs over the tokens in tiles of ``tile_tokens``
            (``layers.tiling``): True, False, or ``"auto"``: :func:`memory.plan` turns it
            on only when that is what makes the plan fit or lets ``seq_len="auto"`` reach further;
            :func:`memory.estimate` reads ``"auto"`` as off (it has no budget to decide against).
        tiled_norms: every RMSNorm/LayerNorm (the final one too) runs in tiles of ``tile_tokens``
            rows, keeping only its input for backward instead of transformers' float32 copies:
            True, False, or ``"auto"``: as ``tiled_mlp`` decides (both ``"auto"``: on or off together).
        tile_tokens: tokens per tile of the tiled MLP and norms (batch and sequence together).
        quant_type, blocksize, double_quant: the 4-bit format of the base linears
            (``nf4``/``fp4``), or ``quant_type="none"``: a 16-bit base (plain LoRA; the
            other two are then unused).
        device: ``cuda`` (CUDA kernels, context and reserve added) or ``cpu``.
        gpus: processes (one GPU each) the run is split over; the footprint is per GPU and the
            effective batch is split among them (:mod:`memory.distributed`). ``"auto"`` (plan only):
            the fewest of 1..64 that fit.
        strategy: with ``gpus > 1``: ``ddp`` (each GPU holds the whole base), ``fsdp`` (FSDP2 shards the
            base, adapter and optimizer state over the GPUs) or ``"auto"``: :func:`memory.plan` picks ddp
            when it fits, else fsdp; :func:`memory.estimate` reads ``"auto"`` as ddp.
        offload_params: with ``strategy="fsdp"``: each rank's shards (base, adapter, gradients,
            optimizer state) live in pinned host memory and only the gathered units come to the GPU
            (FSDP2's ``CPUOffloadPolicy``); True, False, or ``"auto"``: :func:`memory.plan` turns it on
            only when fsdp does not fit without it; :func:`memory.estimate` reads ``"auto"`` as off.
        margin: fraction of the GPU the planner keeps free, in [0, 0.5) (plan only).
        cuda_context_bytes, allocator_reserve: overheads outside the tensor peak;
            the reserve is a fraction of the tensor peak.

    Raises:
        InputError: on construction, any field out of range or not a valid choice.
    """

    seq_len: int | str = field(default=2048, metadata=_opt(
        "--seq-len", "tokens per sequence, or auto: the longest that fits", "N|auto", _int_or_auto, _AUTO))
    micro_batch_size: int | str = field(default=1, metadata=_opt(
        "--batch-size", "micro-batch size, or auto: the largest that fits", "N|auto", _int_or_auto, _AUTO))
    rank: int | str = field(default=16, metadata=_opt(
        "--rank", "LoRA rank, or auto: the largest of 8..256 that fits", "N|auto", _int_or_auto, _AUTO))
    effective_batch_size: int = field(default=16, metadata=_opt(
        "--effective-batch", "sequences per optimizer step; accumulation makes up the rest", "N", int,
        "a positive integer"))
    targets: str | tuple[str, ...] = field(default="all-linear", metadata=_opt(
        "--targets", "all-linear, attention, qv, mlp, module names or a regex", "T", _targets, "names", nargs="+"))
    dropout: float = field(default=0.0, metadata=_opt("--dropout", "LoRA dropout", "P", float, "a number"))
    dora: bool = field(default=False, metadata=_opt("--dora", "DoRA adapters", const=True))
    adalora: bool = field(default=False, metadata=_opt(
        "--adalora", "AdaLoRA adapters: SVD form pruned by importance, rank is the starting rank (recipe "
        "lora.variant: adalora)", const=True))
    vera: bool = field(default=False, metadata=_opt(
        "--vera", "VeRA adapters: shared frozen random matrices, trainable vectors (recipe lora.variant: vera)",
        const=True))
    adapter_dtype: str = field(default="bfloat16", metadata=_opt(
        "--adapter-dtype", "bfloat16, float16 or float32", "DTYPE", str))
    optimizer: str = field(default="paged_adamw_8bit", metadata=_opt(
        "--optimizer", "paged_adamw_8bit, paged_adamw_32bit, adamw_8bit or adamw", "NAME", str))
    init: str = field(default="kaiming", metadata=_opt(
        "--init", "LoRA init: kaiming, gaussian, pissa, olora, loftq or nonzero (the last four rework each weight at "
        "load time)", "INIT", str))
    gradient_checkpointing: bool = field(default=True, metadata=_opt(
        "--no-gradient-checkpointing", "keep every layer's activations instead of recomputing them", const=False))
    attn: str = field(default="auto", metadata=_opt(
        "--attn", "sdpa, eager or auto: sdpa where the model has it", "IMPL", str))
    loss: str = field(default="chunked", metadata=_opt(
        "--hf-loss", "model transformers' loss on full fp32 logits instead (recipe chunked_loss: false)", const="hf"))
    loss_chunk_tokens: int = field(default=1024, metadata=_opt(
        "--chunked-loss", "qlora's chunked loss, TOKENS rows per chunk; recipe chunked_loss: true", "TOKENS", int,
        "a positive integer", nargs="?", implies=(("loss", "chunked"),)))
    offload_activations: bool = field(default=False, metadata=_opt(
        "--offload-activations", "checkpointed layer inputs wait in pinned host memory (recipe offload_activations: "
        "true)", const=True))
    packed: bool = field(default=False, metadata=_opt(
        "--packed", "rows pack several examples (recipe data.packing): counts sdpa's s x s block mask", const=True))
    tiled_mlp: bool | str = field(default="auto", metadata=_opt(
        "--tiled-mlp", "run each MLP over the tokens in tiles (auto: only when that is what fits or lets "
        "--seq-len auto go further)", "auto|on|off", _switch, "auto, on or off"))
    tiled_norms: bool | str = field(default="auto", metadata=_opt(
        "--tiled-norms", "run each norm over the tokens in tiles, without its float32 copies kept for backward "
        "(auto: with the tiled MLP's auto)", "auto|on|off", _switch, "auto, on or off"))
    tile_tokens: int = field(default=4096, metadata=_opt(
        "--tile-tokens", "tokens per tile with --tiled-mlp / --tiled-norms", "N", int, "a positive integer"))
    quant_type: str = field(default="nf4", metadata=_opt(
        "--quant-type", "base format: nf4 or fp4 (4-bit), or none (a 16-bit base: plain LoRA)", "TYPE", str))
    blocksize: int = field(default=64, metadata=_opt(
        "--blocksize", "4-bit quantization block size", "N", int, "a positive integer"))
    double_quant: bool = field(default=True, metadata=_opt(
        "--no-double-quant", "keep the 4-bit blocks' scales in fp32 instead of quantizing them to 8 bits", const=False))
    device: str = field(default="cuda", metadata=_opt(
        "--device", "cuda (a GPU run: CUDA context and allocator reserve counted) or cpu", "DEVICE", str))
    gpus: int | str = field(default=1, metadata=_opt(
        "--gpus", "GPUs (processes) the run is split over, or auto: the fewest that fit; the plan is per GPU",
        "N|auto", _int_or_auto, _AUTO))
    strategy: str = field(default="auto", metadata=_opt(
        "--strategy", "with --gpus > 1: ddp (whole base on each GPU), fsdp (sharded) or auto (ddp if it fits)",
        "NAME", str))
    offload_params: bool | str = field(default="auto", metadata=_opt(
        "--offload-params", "with --strategy fsdp: keep each GPU's shards in pinned host memory, gather units to "
        "the GPU as they run (auto: only when fsdp does not fit without it)", "auto|on|off", _switch,
        "auto, on or off"))
    margin: float = field(default=MARGIN, metadata=_opt(
        "--margin", "fraction of the GPU kept free", "F", float, "a number"))
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    allocator_reserve: float = ALLOCATOR_RESERVE

    def __post_init__(self) -> None:
        for name, minimum in (("seq_len", 2), ("micro_batch_size", 1), ("rank", 1), ("gpus", 1)):
            if getattr(self, name) != "auto":
                _int(getattr(self, name), name, minimum, " or 'auto'")
        _int(self.effective_batch_size, "effective_batch_size")
        _int(self.loss_chunk_tokens, "loss_chunk_tokens")
        _int(self.tile_tokens, "tile_tokens")
        for name in ("tiled_mlp", "tiled_norms", "offload_params"):
            if not (isinstance(getattr(self, name), bool) or getattr(self, name) == "auto"):
                raise InputError(f"{name} must be True, False or 'auto', got {getattr(self, name)!r}.")
        _int(self.cuda_context_bytes, "cuda_context_bytes", 0)
        object.__setattr__(self, "targets", _check_targets(self.targets))
        object.__setattr__(self, "dropout", _fraction(self.dropout, "LoRA dropout must be a number in [0, 1)", 1.0))
        for name in ("dora", "vera", "adalora", "gradient_checkpointing", "offload_activations", "double_quant",
                     "packed"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        chosen = [n for n in ("dora", "vera", "adalora") if getattr(self, n)]
        if len(chosen) > 1:
            raise InputError(f"{' and '.join(chosen)} are all set; an adapter is one variant: pick one of them.")
        one = "vera" if self.vera else "adalora" if self.adalora else None
        if one and self.gpus != 1:
            raise InputError(f"{one} is set with gpus={self.gpus!r}; qlora runs {one} on one GPU (its shared state "
                             "is not sharded yet). Plan it with gpus=1, or LoRA/DoRA on several GPUs.")
        if one and self.init != "kaiming":
            raise InputError(f"{one} is set with init={self.init!r}; {one} starts from its own init, so it takes no "
                             "LoRA init. Leave init at kaiming.")
        _one_of(self.adapter_dtype, tuple(ITEMSIZE), "adapter dtype")
        _one_of(self.optimizer, OPTIMIZERS, "optimizer")
        _one_of(self.init, INITS, "LoRA init")
        _one_of(self.attn, ATTN, "attention implementation")
        _one_of(self.loss, LOSSES, "loss")
        _one_of(self.device, DEVICES, "device")
        _one_of(self.strategy, STRATEGIES, "distributed strategy")
        check_base_format(self.quant_type, self.blocksize)
        _fraction(self.margin, "The safety margin is a fraction of the GPU in [0, 0.5)", 0.5)
        _fraction(self.allocator_reserve, "allocator_reserve is a fraction of the peak in [0, 1)", 1.0)

    def changed(self, **changes) -> Settings:
        """A copy with ``changes`` applied (field name -> value), validated.

        Raises:
            InputError: an unknown field name (the nearest one is suggested) or a bad value.
        """
        return with_changes(self, changes)

    def without_auto(self, caller: str = "memory.estimate") -> Settings:
        """``self``, after checking seq_len, micro_batch_size and rank are numbers.

        Raises:
            InputError: one of them is ``"auto"`` (only :func:`memory.plan` resolves it).
        """
        for name in ("seq_len", "micro_batch_size", "rank", "gpus"):
            if getattr(self, name) == "auto":
                raise InputError(
                    f"{caller} needs a number for {name}, got 'auto'; memory.plan resolves 'auto' for a GPU "
                    f"({flag_name(name)} auto on the command line)."
                )
        return self


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))
_FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(Settings) if "flag" in f.metadata}


def with_changes(settings: Settings | None, changes: Mapping[str, Any], default: Settings | None = None) -> Settings:
    """``settings`` (``default`` when None) with ``changes`` applied by :func:`dataclasses.replace`.

    Raises:
        InputError: ``settings`` is not a :class:`Settings`, a change names no
            field (the nearest one is suggested), or a changed value is invalid.
    """
    base = (DEFAULTS if default is None else default) if settings is None else settings
    if not isinstance(base, Settings):
        raise InputError(
            f"settings must be a memory.Settings, got {type(base).__name__} {base!r}; pass single values by keyword "
            "(seq_len=4096, rank=32)."
        )
    if not changes:
        return base
    unknown = [k for k in changes if k not in FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"Unknown setting {unknown[0]!r}.{hint} Valid settings are {choices(FIELDS)}.")
    return dataclasses.replace(base, **changes)


def flag_of(name: str) -> Flag | None:
    """The command-line :class:`Flag` of field ``name`` (None for fields without one)."""
    return _FLAGS.get(name)


def flag_name(name: str) -> str:
    """``--seq-len`` for ``seq_len``; the field name itself when it has no flag."""
    flag = flag_of(name)
    return flag.name if flag else name


# ---------------------------------------------------------------------------- validation helpers


def _int(value, what: str, minimum: int = 1, alternatives: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}{alternatives}, got {value!r}.")
    return value


def _fraction(value, message: str, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < upper:
        raise InputError(f"{message}, got {value!r}.")
    return float(value)


def _one_of(value, valid, what: str):
    if value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"Unknown {what} {value!r}; valid choices are {choices(valid)}.{hint}")
    return value


def _check_targets(targets) -> str | tuple[str, ...]:
    if isinstance(targets, str) and targets:
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(targets)
    raise InputError(
        f"LoRA targets must be a preset ('all-linear', 'attention', 'qv', 'mlp'), a regex or a list of module "
        f"names; got {targets!r}."
    )


DEFAULTS = Settings()
# memory.plan's starting point when it is given no settings: the micro-batch is searched.
PLAN_DEFAULTS = Settings(micro_batch_size="auto")
