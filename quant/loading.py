"""Stream a Hugging Face checkpoint straight into a 4-bit (or plain 16-bit) model on the device.

The model is built from its config with parameters on the meta device (no
memory), while buffers are built for real by the model's own constructor:
that is how non-persistent buffers such as the rotary ``inv_freq`` and
Gemma's ``embed_scale`` get exactly the values (and dtypes) transformers
gives them, without copying transformers' init code. Then tensors are read one
at a time: each ``nn.Linear`` weight is moved to the device and quantized
there (or, for a pre-quantized bitsandbytes checkpoint, its packed codes and
scales are installed as they are); every other parameter is materialized in
its 16-bit dtype. Host memory therefore peaks near the largest single tensor
(plus the model itself when the device is the CPU), not at the model's size.
``quant_type="none"`` streams the same way and quantizes nothing (a 16-bit
base for plain LoRA, the baseline QLoRA is compared against).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .blockwise import QuantState4bit, quantize_4bit
from .checkpoint import BNB_SUFFIXES, Checkpoint
from .dtypes import FLOAT_DTYPES, parse_dtype
from .errors import InputError
from .formats import NO_QUANT, check_base_format
from .linear import NF4Linear
from .model import DEFAULT_SKIP, linear_names, skipped_names

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current key)


def load_config(ckpt: Checkpoint):
    """The transformers config of ``ckpt``.

    Raises:
        InputError: transformers does not know the ``model_type``.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(ckpt.path))
    except (ValueError, KeyError, OSError) as e:
        raise InputError(
            f"transformers cannot read the config of {str(ckpt.path)!r} "
            f"(model_type {ckpt.config.get('model_type')!r}): {str(e).splitlines()[0]}"
        ) from None


def resolve_dtype(dtype: torch.dtype | str | None, config) -> torch.dtype:
    """The dtype of everything that stays unquantized, with the reason logged.

    Order: the explicit ``dtype`` argument, else the config's ``dtype`` /
    ``torch_dtype`` (the dtype the checkpoint was saved in), else bfloat16.

    Raises:
        InputError: ``dtype`` is not float32, float16 or bfloat16.
    """
    if dtype is not None:
        out = parse_dtype(dtype)
        log.info("16-bit tensors use %s: passed explicitly", out)
        return out
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if cfg is not None and str(cfg) != "auto":
        out = parse_dtype(cfg if isinstance(cfg, torch.dtype) else str(cfg), what="dtype in config.json")
        log.info("16-bit tensors use %s: the dtype recorded in config.json", out)
        if out == torch.float32:
            log.warning(
                "config.json says float32: embeddings, norms and lm_head stay float32 (2x the memory of bf16); "
                "pass dtype=torch.bfloat16 to halve it"
            )
        return out
    log.info("16-bit tensors use torch.bfloat16: config.json records no dtype")
    return torch.bfloat16


def parse_device(device: torch.device | str) -> torch.device:
    """Validate a device string.

    Raises:
        InputError: unknown device, or CUDA requested but not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"Unknown device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} was requested but no CUDA GPU is available; use device='cpu'.")
    return dev


def empty_model(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The causal LM of ``config`` with parameters on the meta device and real buffers on the CPU.

    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``) is
    passed to transformers; None keeps its default.

    Raises:
        InputError: the config does not describe a causal LM transformers can
            build, or the attention implementation is not available here.
    """
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        # include_buffers=False: parameters go to meta (free), buffers are
        # computed by the modules' own __init__ (a few KB: rotary tables, scales).
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    except ImportError as e:  # flash_attention_2 without the flash-attn package, for instance
        raise InputError(
            f"Attention implementation {attn_implementation!r} is not available here ({str(e).splitlines()[0]}); "
            "use 'sdpa' or 'eager' (recipe key model.attn_implementation)."
        ) from None
    except ValueError as e:
        first = str(e).splitlines()[0]
        if attn_implementation is not None and "attention" in first.lower():
            raise InputError(
                f"This model cannot use attention implementation {attn_implementation!r} ({first}); valid choices "
                "are 'sdpa', 'eager' or 'flash_attention_2' where the architecture and installed packages have them."
            ) from None
        raise InputError(f"transformers cannot build a causal LM from this config: {first}") from None


@dataclass(frozen=True)
class UnitHook:
    """Load a model one unit (a module: a decoder layer) at a time, acting on each unit as it completes.

    With FSDP2 this is what keeps a base larger than one GPU loadable: ``done`` shards the unit
    (``fully_shard``), so only one unit is ever whole on the device, not the model.

    Attributes:
        names: ``names(model)`` -> the units' qualified module names, in loading order. Called once on the
            empty model (every parameter on the meta device) before any tensor is read, so it is also the
            place to check a plan against the model's structure.
        done: ``done(model, name)``, called once every tensor under ``name`` is in, before the next unit's
            are read. Tensors outside every unit (embeddings, final norm, head) load after the last unit.
    """

    names: Callable[[nn.Module], Sequence[str]]
    done: Callable[[nn.Module, str], None]


@dataclass
class CheckpointPlan:
    """Which checkpoint tensors become 4-bit, checked against the model before any data is read.

    Attributes:
        quantize: module names whose ``nn.Linear`` weight becomes 4-bit.
        keep: ``nn.Linear`` modules that stay 16-bit.
        prequantized: the checkpoint already holds bitsandbytes 4-bit weights.
        tied: checkpoint keys that may be absent because they are tied to another.
    """

    quantize: set[str]
    keep: set[str]
    prequantized: bool
    tied: set[str] = field(default_factory=set)

    def module_of(self, key: str) -> str | None:
        """The quantized module that owns ``key`` (its weight or a bnb companion), else None."""
        for suffix in ("weight",) + BNB_SUFFIXES:
            if key.endswith("." + suffix) and key[: -len(suffix) - 1] in self.quantize:
                return key[: -len(suffix) - 1]
        return None


def plan_checkpoint(
    model: nn.Module, ckpt: Checkpoint, skip: Iterable[str] = DEFAULT_SKIP, quantize: bool = True
) -> CheckpointPlan:
    """Match ``ckpt``'s keys to ``model`` (built by :func:`empty_model`) and choose what to quantize.

    ``quantize=False`` (``quant_type="none"``, a 16-bit checkpoint) keeps every linear 16-bit.

    Raises:
        InputError: missing or unexpected keys, shape mismatches, non-floating
            parameters, or 4-bit weights on modules that are not ``nn.Linear``.
    """
    prequantized = ckpt.quantization_config is not None
    linears = set(linear_names(model))
    chosen: set[str] = set()
    if prequantized and quantize:
        chosen = {p.removesuffix(".") for p in ckpt.bnb_modules()}
        strays = sorted(chosen - linears)
        if strays:
            raise InputError(
                f"The checkpoint has 4-bit weights for {strays[:3]}, "
                f"which are not nn.Linear modules of this {type(model).__name__}."
            )
    elif quantize:
        chosen = linears - skipped_names(model, skip)
    plan = CheckpointPlan(quantize=chosen, keep=linears - chosen, prequantized=prequantized)
    if getattr(model.config, "tie_word_embeddings", False):
        plan.tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected = dict(model.state_dict(keep_vars=True))  # meta params: names, shapes, dtypes, no data
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    missing = sorted(
        k for k in expected if k not in ckpt and k not in plan.tied and not (prequantized and plan.module_of(k))
    )
    if prequantized:
        missing += sorted(m + ".weight" for m in chosen if m + ".weight" not in ckpt)
    unexpected = sorted(
        k for k in ckpt.keys() if k not in expected and not plan.module_of(k) and not any(p.search(k) for p in ignore)
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}")
        raise InputError(
            f"The checkpoint in {str(ckpt.path)!r} does not match its config ({type(model).__name__}): "
            f"{' and '.join(parts)}. Is config.json from the same model as the weights?"
        )
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for key in ckpt.keys():
        if key not in expected or (prequantized and plan.module_of(key)):
            continue
        want, have = tuple(expected[key].shape), ckpt.shape(key)
        if want != have:
            raise InputError(
                f"Tensor {key!r} has shape {list(have)} in the checkpoint but the config implies {list(want)}."
            )
        if key in params and ckpt.dtype(key) not in FLOAT_DTYPES + (torch.float64,):
            raise InputError(
                f"Tensor {key!r} has dtype {ckpt.dtype(key)}, but a parameter must be floating point "
                "(float32, float16 or bfloat16) to be "
                f"{'quantized' if key.removesuffix('.weight') in chosen else 'loaded'}."
            )
    return plan


def load_quantized_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = DEFAULT_SKIP,
    dtype: torch.dtype | str | None = None,
    progress: Progress | None = None,
    attn_implementation: str | None = None,
    units: UnitHook | None = None,
) -> nn.Module:
    """Load a local checkpoint directly into a 4-bit model on ``device``.

    Works for 16-bit checkpoints (quantized on the fly, one weight at a time,
    on ``device``) and for bitsandbytes 4-bit checkpoints (installed as
    stored, never re-quantized; ``quant_type``/``blocksize``/``double_quant``
    then come from the file and the arguments are ignored). ``quant_type="none"``
    quantizes nothing: a 16-bit checkpoint is streamed into plain ``nn.Linear``
    layers in ``dtype`` (the plain-LoRA baseline, 16 instead of ~4.1 bits per
    linear weight).

    Args:
        model_dir: directory with config.json and *.safetensors (single file or sharded).
        device: where the model lives and where quantization runs.
        quant_type, blocksize, double_quant: the 4-bit format for 16-bit checkpoints
            (``nf4`` or ``fp4``), or ``quant_type="none"``: no quantization (the other two unused).
        compute_dtype: matmul dtype of every 4-bit layer (unused with ``none``: plain linears
            compute in their weight's dtype, or the caller's autocast dtype).
        skip: extra ``nn.Linear`` names/suffixes/regexes that stay 16-bit
            (the output embedding always does). For a 4-bit checkpoint the
            file decides which linears are 4-bit.
        dtype: dtype of the unquantized tensors; None: config.json's, else bfloat16.
        progress: optional callback ``(bytes_done, bytes_total, key)`` after each tensor.
        attn_implementation: transformers' attention (``sdpa``, ``eager``...); None: its default.
        units: load unit by unit and call ``units.done`` after each (:class:`UnitHook`); None: in file order.

    Returns:
        A transformers ``PreTrainedModel`` in eval mode whose quantized
        linears are :class:`NF4Linear` (uint8 packed weights) and whose other
        parameters are ``dtype`` tensors on ``device`` (with ``none``: every
        linear an ``nn.Linear`` in ``dtype``).

    Raises:
        InputError: bad arguments, not a model directory, a checkpoint that
            does not match its config, a corrupt/missing 4-bit entry, or a
            bitsandbytes 4-bit checkpoint with ``quant_type="none"``.
    """
    check_base_format(quant_type, blocksize)
    compute_dtype = parse_dtype(compute_dtype, what="compute dtype")
    dev = parse_device(device)
    ckpt = Checkpoint(model_dir)
    quantize = quant_type != NO_QUANT
    if not quantize and ckpt.quantization_config is not None:
        raise InputError(
            f"{str(ckpt.path)!r} is a bitsandbytes 4-bit checkpoint (quantization_config in config.json), so it "
            f"has no 16-bit weights for quant_type {NO_QUANT!r} (a 16-bit base); use quant_type 'nf4' or 'fp4' "
            "(its 4-bit weights are then installed as stored), or the 16-bit checkpoint it was made from."
        )
    config = load_config(ckpt)
    dtype = resolve_dtype(dtype, config)
    model = empty_model(config, dtype, attn_implementation)
    plan = plan_checkpoint(model, ckpt, skip, quantize=quantize)
    if not quantize:
        log.info(
            "quant_type none: no linear is quantized; all %d linear weights stay %s (a 16-bit base for plain "
            "LoRA: 16 bits per weight instead of ~4.1 with nf4; compute_dtype %s does not apply)",
            len(plan.keep), dtype, compute_dtype,
        )
    if plan.prequantized:
        qc = ckpt.quantization_config
        log.info(
            "%s is a bitsandbytes 4-bit checkpoint (%s, double_quant=%s): "
            "installing its %d quantized weights as stored; "
            "the quant_type/blocksize/double_quant arguments do not apply",
            ckpt.path, qc.get("bnb_4bit_quant_type"), qc.get("bnb_4bit_use_double_quant"), len(plan.quantize),
        )
        if qc.get("bnb_4bit_compute_dtype") not in (None, str(compute_dtype).removeprefix("torch.")):
            log.info(
                "compute dtype %s (the file suggests %s; the argument wins)",
                compute_dtype, qc.get("bnb_4bit_compute_dtype"),
            )
    for mod in model.modules():  # buffers were built on the CPU: move them (a few KB)
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != dev:
                mod._buffers[name] = buf.to(dev)
    stream = _Stream(model, ckpt, plan, dev, dtype, compute_dtype, (quant_type, blocksize, double_quant), progress)
    if units is None:
        stream(ckpt.keys())
    else:
        names = list(units.names(model))
        groups: dict[str | None, list[str]] = {n: [] for n in names}
        for key in ckpt.keys():
            groups.setdefault(next((n for n in names if key.startswith(n + ".")), None), []).append(key)
        for name in names:
            stream(groups[name])
            units.done(model, name)
        stream(groups.get(None, []))
    stream.log_casts()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = sorted(
        n for n, t in list(model.named_parameters(remove_duplicate=False))
        + list(model.named_buffers(remove_duplicate=False)) if t.is_meta
    )
    if left:  # plan_checkpoint should have caught this; a model-specific tensor layout we do not know
        raise InputError(f"After loading {str(ckpt.path)!r}, {len(left)} tensor(s) were never filled, e.g. {left[:4]}.")
    if (ckpt.path / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    model.eval()
    log.info(
        "loaded %s on %s: %d linear layers 4-bit, kept 16-bit (%s): %s",
        type(model).__name__, dev, len(plan.quantize), dtype, (sorted(plan.keep) or "none") if quantize else "all",
    )
    return model


class _Stream:
    """Reads checkpoint tensors into the model, a list of keys at a time (progress counts across calls)."""

    def __init__(self, model, ckpt, plan, dev, dtype, compute_dtype, fmt, progress):
        self.model, self.ckpt, self.plan, self.dev, self.dtype = model, ckpt, plan, dev, dtype
        self.compute_dtype, self.fmt, self.progress = compute_dtype, fmt, progress
        self.params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.total, self.done = ckpt.total_bytes(), 0
        self.casts: dict[tuple[torch.dtype, torch.dtype], int] = {}

    def __call__(self, keys: Iterable[str]) -> None:
        model, ckpt, plan, dev, dtype = self.model, self.ckpt, self.plan, self.dev, self.dtype
        quant_type, blocksize, double_quant = self.fmt
        for key in keys:
            owner = plan.module_of(key)
            if owner is not None and plan.prequantized:
                if not key.endswith(".weight"):
                    continue  # a companion: read together with its weight below
                packed, state = ckpt.read_bnb_weight(owner + ".")
                _install_4bit(model, owner, packed.to(dev), state.to(dev), self.compute_dtype)
                self.done += sum(ckpt.nbytes(owner + "." + s) for s in ("weight",) + BNB_SUFFIXES
                                 if owner + "." + s in ckpt)
            else:
                t = ckpt.get(key)
                self.done += ckpt.nbytes(key)
                if key in self.params and t.dtype != dtype:
                    # Parameters (and weights about to be quantized, so the quant
                    # state records `dtype`, as transformers does) take `dtype`.
                    # Narrowing casts run on the host (less to transfer), widening ones on the device.
                    self.casts[(t.dtype, dtype)] = self.casts.get((t.dtype, dtype), 0) + 1
                    t = t.to(dtype) if t.element_size() >= dtype.itemsize else t.to(dev).to(dtype)
                t = t.to(dev)
                if owner is not None:
                    packed, state = quantize_4bit(t, quant_type, blocksize, double_quant)
                    _install_4bit(model, owner, packed, state, self.compute_dtype)
                else:
                    _assign(model, key, t)
                del t
            if self.progress is not None:
                self.progress(self.done, self.total, key)

    def log_casts(self) -> None:
        for (src, dst), n in self.casts.items():
            log.info("cast %d checkpoint tensors from %s to %s", n, src, dst)


def _install_4bit(model: nn.Module, name: str, packed: torch.Tensor, state: QuantState4bit, compute_dtype) -> None:
    """Swap the (meta) ``nn.Linear`` called ``name`` for an NF4Linear holding ``packed``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, NF4Linear):
        raise InputError(f"The checkpoint holds two weights for {name!r}.")
    new = NF4Linear(
        old.in_features, old.out_features, old.bias is not None, state.quant_type, state.blocksize,
        state.double_quant, compute_dtype, state.dtype, device="meta",
    )
    new.load_quantized(packed, state)
    if old.bias is not None:
        new.bias = old.bias.detach()  # meta until its key arrives, or already loaded
    setattr(parent, child, new)


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer called ``key``."""
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in mod._buffers:
        old = mod._buffers[attr]
        # A persistent buffer keeps the dtype the model's constructor gave it.
        mod._buffers[attr] = value if old is None else value.to(old.dtype)
    else:
        raise InputError(f"Checkpoint tensor {key!r} does not correspond to a parameter or buffer of the model.")
