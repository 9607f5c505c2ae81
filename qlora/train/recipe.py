"""Recipes: YAML files validated into small typed dataclasses.

A recipe is a nested mapping whose sections mirror the dataclasses below.
Unknown keys and wrong types raise ``InputError`` naming the dotted key and
the valid choices; ``key=value`` overrides use dotted keys
(``lora.rank=16``, ``optimizer.lr=1e-4``) and are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from quant.errors import InputError, choices

Auto = Literal["auto"]


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-llama"  # local HF dir, a pre-quantized bnb-4bit dir, or builtin:tiny-llama
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # non-quantized params (embeddings, norms, head)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class LoraConfig:
    targets: Union[str, list[str]] = "all-linear"
    rank: Union[int, Auto] = 16
    alpha: float = 32.0
    dropout: float = 0.0
    variant: Literal["lora", "dora"] = "lora"
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    freeze_A: bool = False  # LoRA-FA
    loraplus_ratio: Union[float, None] = None  # LoRA+: lr(B) = ratio * lr
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str = "builtin:tiny-chat"  # jsonl/json/csv/parquet/txt file, a save_to_disk folder, or builtin:*
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    eval_path: Union[str, None] = None
    eval_fraction: float = 0.05  # held out from `path` when eval_path is not given
    train_on: Literal["completion", "all"] = "completion"
    packing: bool = True
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"


@dataclass
class OptimizerConfig:
    name: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seq_len: Union[int, Auto] = 512
    micro_batch_size: Union[int, Auto] = "auto"
    effective_batch_size: int = 16
    max_steps: Union[int, None] = None
    epochs: float = 1.0
    gradient_checkpointing: bool = True
    offload_activations: bool = False  # checkpointed layer inputs in pinned host memory (qlora.train.offload); needs checkpointing
    chunked_loss: bool = True
    max_grad_norm: Union[float, None] = 1.0
    eval_steps: int = 50
    save_steps: int = 50
    keep_checkpoints: int = 2
    log_steps: int = 1
    diagnostics_steps: int = 50
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu: Union[str, None] = None  # memory budget for planning, e.g. "24GB"; default: the device's own
    output_dir: str = "runs/out"


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return choices(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except InputError:
                continue
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            return [value]
        if isinstance(value, list):
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        kt, vt = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept it as the number it means
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise InputError(f"Recipe key '{key}' has value {value!r}, but it must be {_type_name(tp)}.")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"Recipe section '{prefix or 'top level'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputError(f"Unknown recipe key '{dotted}'.{hint} Valid keys here are {choices(names)}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    recipe = cls(**kwargs)
    _check_ranges(recipe, prefix)
    return recipe


def _positive(obj: Any, prefix: str, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, (int, float)) and (v < 0 or (v == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise InputError(f"Recipe key '{prefix + '.' if prefix else ''}{n}' is {v!r}; it must be {bound}.")


def _check_ranges(obj: Any, prefix: str) -> None:
    if isinstance(obj, Recipe):
        _positive(obj, prefix, "seq_len", "micro_batch_size", "effective_batch_size", "max_steps", "epochs",
                  "eval_steps", "save_steps", "log_steps", "diagnostics_steps", "keep_checkpoints")
        if obj.offload_activations and not obj.gradient_checkpointing:
            raise InputError("Recipe key 'offload_activations' is true but 'gradient_checkpointing' is false: only "
                             "checkpointed layer inputs are offloaded. Set gradient_checkpointing: true or offload_activations: false.")
    elif isinstance(obj, LoraConfig):
        _positive(obj, prefix, "rank", "alpha")
        if not 0.0 <= obj.dropout < 1.0:
            raise InputError(f"Recipe key '{prefix}.dropout' is {obj.dropout!r}; it must be in [0, 1).")
    elif isinstance(obj, OptimizerConfig):
        _positive(obj, prefix, "lr")
        _positive(obj, prefix, "weight_decay", allow_zero=True)
    elif isinstance(obj, QuantConfig):
        from quant import BLOCKSIZES

        if obj.blocksize not in BLOCKSIZES:
            raise InputError(f"Recipe key '{prefix}.blocksize' is {obj.blocksize!r}; valid choices are {choices(BLOCKSIZES)}.")
    elif isinstance(obj, DataConfig):
        if not 0.0 <= obj.eval_fraction < 1.0:
            raise InputError(f"Recipe key '{prefix}.eval_fraction' is {obj.eval_fraction!r}; it must be in [0, 1).")
    elif isinstance(obj, ScheduleConfig):
        _positive(obj, prefix, "warmup_steps", allow_zero=True)


def recipe_from_dict(data: dict) -> Recipe:
    """Validate a plain mapping into a :class:`Recipe`.

    Raises:
        InputError: unknown key, wrong type or out-of-range value (named by dotted key).
    """
    return _build(Recipe, data or {}, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a raw recipe mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"Override {item!r} is not of the form key=value (for example lora.rank=16).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise InputError(f"Override {item!r}: cannot parse value {raw!r} ({e.__class__.__name__}).") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"Override {item!r}: '{p}' is not a section.")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides and validate.

    Relative data/model paths are resolved against the recipe file's folder
    when they exist there, else against the current directory.

    Raises:
        InputError: missing/unreadable file, bad YAML, or invalid values.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Recipe file {str(p)!r} does not exist (give the path to a .yaml recipe, e.g. recipes/tiny-cpu.yaml).")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"Recipe {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"Recipe {str(p)!r} must be a YAML mapping of sections, got {type(data).__name__}.")
    recipe = recipe_from_dict(apply_overrides(data, overrides or []))
    base = p.resolve().parent
    for section, attr in (("model", "path"), ("data", "path"), ("data", "eval_path")):
        obj = getattr(recipe, section)
        val = getattr(obj, attr)
        if val and not val.startswith("builtin:") and not Path(val).is_absolute() and (base / val).exists():
            setattr(obj, attr, str(base / val))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The plain mapping of a recipe (for saving the resolved recipe next to checkpoints)."""
    return dataclasses.asdict(recipe)
