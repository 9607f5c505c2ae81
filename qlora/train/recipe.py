"""Recipes: YAML files validated into small typed dataclasses.

A recipe is a nested mapping whose sections mirror the dataclasses below.
pydantic checks every value against the annotations (strict: ``"yes"`` is not
a bool, ``8.0`` is not a rank), and :func:`_input_error` turns its report into
one ``InputError`` paragraph that names the dotted key, the bad value and the
valid choices, with the nearest key for a typo. ``key=value`` overrides use
dotted keys (``lora.rank=16``, ``optimizer.lr=1e-4``) and are parsed as YAML
scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from quant.errors import InputError, choices


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as a string, and ``1`` as an int: accept both as the number meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Auto = Literal["auto"]
Int = StrictInt
Bool = StrictBool
Str = StrictStr
Float = Annotated[StrictFloat, BeforeValidator(_yaml_number)]
Positive = Annotated[StrictInt, Field(gt=0)]
NonNegative = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]  # [0, 1)
# auto: bfloat16 where the device multiplies it natively, else float32 (qlora.train.precision)
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
_SECTION = ConfigDict(extra="forbid")  # an unknown key is an error, never silently ignored


@dataclass
class ModelConfig:
    __pydantic_config__ = _SECTION
    path: Str = "builtin:tiny-llama"  # local HF dir, a pre-quantized bnb-4bit dir, or builtin:tiny-llama
    dtype: Dtype = "auto"  # non-quantized params (embeddings, norms, head)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class QuantConfig:
    __pydantic_config__ = _SECTION
    quant_type: Literal["nf4", "fp4", "none"] = "nf4"  # none: a 16-bit base, plain LoRA (the baseline)
    blocksize: Int = 64  # one of quant.BLOCKSIZES (checked in _check: quant imports torch)
    double_quant: Bool = True
    compute_dtype: Dtype = "auto"


@dataclass
class LoraConfig:
    __pydantic_config__ = _SECTION
    targets: Union[Str, list[Str]] = "all-linear"
    rank: Union[Positive, Auto] = 16
    alpha: PositiveFloat = 32.0
    dropout: Fraction = 0.0
    # vera: shared frozen random matrices, trainable vectors only (layers.vera); no alpha, rslora or patterns
    # delta: Delta-LoRA, the base follows delta_ratio times the adapter's change (layers.delta); no dropout
    # adalora: the update in SVD form, pruned from lora.rank to adalora_target_r per layer on average by
    # importance (layers.adalora, qlora.lora.adalora); PEFT's AdaLoraConfig names and defaults
    variant: Literal["lora", "dora", "vera", "delta", "adalora"] = "lora"
    delta_ratio: Annotated[Float, Field(ge=0)] = 1.0  # delta: λ
    adalora_target_r: Positive = 8
    adalora_tinit: NonNegative = 0  # steps before any pruning
    adalora_tfinal: NonNegative = 0  # steps at the end with the ranks fixed
    adalora_delta_t: Positive = 1  # steps between two allocations
    adalora_beta1: Annotated[Float, Field(gt=0, lt=1)] = 0.85  # EMA of the sensitivity
    adalora_beta2: Annotated[Float, Field(gt=0, lt=1)] = 0.85  # EMA of its uncertainty
    adalora_orth_reg: Annotated[Float, Field(ge=0)] = 0.5  # weight of the orthogonality penalty
    d_initial: Float = 0.1  # vera: the start of every d (b starts at zero)
    projection_prng_key: NonNegative = 0  # vera: the seed of the shared matrices (PEFT's key draws PEFT's)
    use_rslora: Bool = False
    # kaiming/gaussian: A random, B zero. pissa/olora/loftq: the adapter starts from the weights (layers.inits);
    # nonzero: A and B both Gaussian, W - s·B·A the base
    # and the rest is the (re-quantized) base; the saved adapter is rank 2r, for the original base
    init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq", "nonzero"] = "kaiming"
    nonzero_ratio: PositiveFloat = 0.1  # nonzero: the starting update's RMS over the weight's
    loftq_iters: Positive = 1  # loftq: alternations of quantize / low-rank fit
    pissa_niter: Union[Positive, None] = None  # pissa: randomized SVD with this many iterations; null: exact
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    freeze_A: Bool = False  # LoRA-FA
    loraplus_ratio: Union[PositiveFloat, None] = None  # LoRA+: lr(B) = ratio * lr
    rank_pattern: dict[Str, Int] = field(default_factory=dict)
    alpha_pattern: dict[Str, Float] = field(default_factory=dict)


@dataclass
class DataConfig:
    __pydantic_config__ = _SECTION
    path: Str = "builtin:tiny-chat"  # jsonl/json/csv/parquet/txt file, a save_to_disk folder, or builtin:*
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    eval_path: Union[Str, None] = None
    eval_fraction: Fraction = 0.05  # held out from `path` when eval_path is not given
    train_on: Literal["completion", "all"] = "completion"
    packing: Bool = True
    text_field: Str = "text"
    instruction_field: Str = "instruction"
    input_field: Str = "input"
    output_field: Str = "output"
    messages_field: Str = "messages"


@dataclass
class TaskConfig:
    """Generate replies for held-out prompts and score them exactly (``qlora.tasks``), before and after training."""

    __pydantic_config__ = _SECTION
    examples: NonNegative = 0  # held-out chat/instruction examples to answer and score; 0: off
    max_new_tokens: Positive = 64
    batch_size: Positive = 16  # prompts generated together (left-padded)


@dataclass
class OptimizerConfig:
    __pydantic_config__ = _SECTION
    name: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    lr: PositiveFloat = 2e-4
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    betas: list[Float] = field(default_factory=lambda: [0.9, 0.999])
    eps: Float = 1e-8


@dataclass
class ScheduleConfig:
    __pydantic_config__ = _SECTION
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegative = 0
    min_lr_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.0


@dataclass
class DistributedConfig:
    """How a run launched by ``torchrun`` on N processes splits its work (ignored on one process)."""

    __pydantic_config__ = _SECTION
    # ddp: every rank holds the whole NF4 base, LoRA gradients are all-reduced; fsdp: FSDP2 shards the base,
    # the adapter and its optimizer state across ranks; auto: the planner's choice (ddp when it fits)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # the processes the recipe is planned for (qlora plan --model RECIPE plans one GPU of them); qlora train
    # refuses another world size. null: whatever torchrun starts
    gpus: Union[Positive, None] = None
    # fsdp only: each rank's shards live in pinned host memory, units are gathered to the GPU as they run
    # (FSDP2's CPUOffloadPolicy); auto: the planner turns it on when fsdp does not fit without it
    offload_params: Union[Bool, Auto] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on the CPU
    timeout_s: Positive = 600  # a collective waiting longer than this fails (a dead or stuck rank)


@dataclass
class Recipe:
    __pydantic_config__ = _SECTION
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seq_len: Union[Positive, Auto] = 512
    micro_batch_size: Union[Positive, Auto] = "auto"
    effective_batch_size: Positive = 16
    max_steps: Union[Positive, None] = None
    epochs: PositiveFloat = 1.0
    gradient_checkpointing: Bool = True
    offload_activations: Bool = False  # checkpointed layer inputs in pinned host memory (qlora.train.offload)
    tiled_mlp: Union[Bool, Auto] = "auto"  # MLPs over the tokens in tiles (layers.tiling); auto: the planner's call
    tiled_norms: Union[Bool, Auto] = "auto"  # norms in tiles, no fp32 copies kept (layers.tiling); auto: as tiled_mlp
    tile_tokens: Positive = 4096  # tokens per tile of the tiled MLP and norms
    chunked_loss: Bool = True
    max_grad_norm: Union[Float, None] = 1.0
    eval_steps: Positive = 50
    save_steps: Positive = 50
    keep_checkpoints: Positive = 2
    log_steps: Positive = 1
    diagnostics_steps: Positive = 50
    seed: Int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu: Union[Str, None] = None  # memory budget for planning, e.g. "24GB"; default: the device's own
    output_dir: Str = "runs/out"


# --------------------------------------------------------------------------- validation

_ADAPTER = TypeAdapter(Recipe)  # built once: pydantic compiles the validator for all sections


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error message (``'nf4' or 'fp4'``, ``an integer or 'auto'``)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return choices(typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + _PLURAL.get(getattr(item, "__origin__", item), "values")
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is None and hasattr(tp, "__metadata__"):  # pydantic's StrictInt & co.
        return _type_name(tp.__origin__)
    return _NAMES.get(tp, str(tp))


def _limits(tp: Any) -> dict[str, float]:
    """``{'gt': 0}``, ``{'ge': 0, 'lt': 1}``...: the bounds in an annotation, its union members included."""
    out: dict[str, float] = {}
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            out |= _limits(arg)
    elif origin is Annotated:
        base, *meta = typing.get_args(tp)
        out |= _limits(base)
        for m in meta:  # pydantic's FieldInfo keeps annotated_types' Gt/Ge/Lt/Le in .metadata
            for c in getattr(m, "metadata", [m]):
                out |= {k: getattr(c, k) for k in ("gt", "ge", "lt", "le") if getattr(c, k, None) is not None}
    return out


def _bound(tp: Any) -> str | None:
    """The range an annotation allows, in words (``> 0``, ``in [0, 1)``), or None."""
    lim = _limits(tp)
    if "ge" in lim and ("lt" in lim or "le" in lim):
        return f"in [{lim['ge']:g}, {lim.get('lt', lim.get('le')):g}{')' if 'lt' in lim else ']'}"
    return next((f"{op} {lim[k]:g}" for k, op in (("gt", ">"), ("ge", ">=")) if k in lim), None)


def _input_error(e: ValidationError, data: dict) -> InputError:
    """One paragraph for pydantic's first error: the dotted key, the bad value and what it must be."""
    errors = e.errors()
    # a value out of range also fails the other members of its union ('auto'): report the range
    err = next((x for x in errors if x["type"] in ("greater_than", "greater_than_equal", "less_than",
                                                  "less_than_equal")), errors[0])
    cls, raw, path = Recipe, data, []
    for part in err["loc"]:  # walk the sections; what follows a field name is pydantic's union/list detail
        names = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in names:
            if err["type"] == "unexpected_keyword_argument" and isinstance(part, str):
                close = difflib.get_close_matches(part, list(names), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                dotted = ".".join([*path, part])
                return InputError(f"Unknown recipe key '{dotted}'.{hint} Valid keys here are {choices(names)}.")
            break
        path.append(part)
        cls = typing.get_type_hints(cls, include_extras=True)[part]
        raw = raw.get(part) if isinstance(raw, dict) else raw
    key = ".".join(path) or "top level"
    if dataclasses.is_dataclass(cls):
        return InputError(f"Recipe section '{key}' must be a mapping, got {raw!r}.")
    bound = _bound(cls)
    if bound and err["type"].startswith(("greater", "less")):
        return InputError(f"Recipe key '{key}' is {raw!r}; it must be {bound}.")
    return InputError(f"Recipe key '{key}' has value {raw!r}, but it must be {_type_name(cls)}.")


def _check(recipe: Recipe) -> Recipe:
    """What one annotation cannot say: the blocksize table (quant imports torch), and one cross-key rule."""
    from quant import BLOCKSIZES

    if recipe.quant.blocksize not in BLOCKSIZES:
        raise InputError(f"Recipe key 'quant.blocksize' is {recipe.quant.blocksize!r}; "
                         f"valid choices are {choices(BLOCKSIZES)}.")
    init, lora = recipe.lora.init, recipe.lora
    if init in ("pissa", "olora", "loftq", "nonzero") and lora.variant == "dora":
        raise InputError(f"Recipe keys 'lora.init' {init!r} and 'lora.variant' 'dora' do not go together: the DoRA "
                         f"magnitude would need its own init from the moved weights. Use lora.variant lora with "
                         f"{init}, or lora.init kaiming/gaussian with dora.")
    if lora.variant in ("vera", "adalora"):
        _check_exclusive(lora)
    if lora.variant == "delta" and lora.dropout:
        raise InputError(f"Recipe keys 'lora.variant' 'delta' and 'lora.dropout' {lora.dropout!r} do not go together: "
                         "Delta-LoRA's base follows the product B·A on the whole input, so it takes no dropout (as in "
                         "the paper). Set lora.dropout: 0, or use lora.variant lora with dropout.")
    if lora.variant == "delta" and init in ("pissa", "olora", "loftq", "nonzero"):
        raise InputError(f"Recipe keys 'lora.variant' 'delta' and 'lora.init' {init!r} do not go together: Delta-LoRA "
                         "starts with B at zero, so that the base's whole update is λ times the adapter. Use "
                         "lora.init kaiming/gaussian with delta, or lora.variant lora with "
                         f"{init}.")
    if init == "loftq" and recipe.quant.quant_type == "none":
        raise InputError("Recipe keys 'lora.init' 'loftq' and 'quant.quant_type' 'none' do not go together: LoftQ "
                         "fits the adapter to the 4-bit base's quantization error, and a 16-bit base has none. Use "
                         "lora.init pissa or olora on a 16-bit base, or quant.quant_type nf4/fp4 with loftq.")
    if recipe.offload_activations and not recipe.gradient_checkpointing:
        raise InputError("Recipe key 'offload_activations' is true but 'gradient_checkpointing' is false: only "
                         "checkpointed layer inputs are offloaded. Set gradient_checkpointing: true or "
                         "offload_activations: false.")
    return recipe


_WHY = {  # (variant, key) -> why the LoRA option has no meaning there
    ("vera", "init"): "VeRA's matrices are seeded random ones and b starts at zero",
    ("vera", "rank_pattern"): "one shared pair of matrices has one rank",
    ("vera", "alpha_pattern"): "VeRA has no alpha",
    ("vera", "use_rslora"): "VeRA has no alpha/r scale to stabilize",
    ("vera", "freeze_A"): "VeRA's A is frozen already",
    ("vera", "loraplus_ratio"): "VeRA has no B factor to speed up",
    ("adalora", "init"): "AdaLoRA starts from its own init (A and B Gaussian, E zero)",
    ("adalora", "rank_pattern"): "AdaLoRA allocates the ranks itself, from lora.rank down to lora.adalora_target_r",
    ("adalora", "alpha_pattern"): "AdaLoRA's scale is alpha/r0 for every layer (PEFT's)",
    ("adalora", "use_rslora"): "AdaLoRA's scale is alpha/r0 (PEFT's), not alpha/sqrt(r)",
    ("adalora", "freeze_A"): "AdaLoRA scores and prunes A's rows, which must train",
    ("adalora", "loraplus_ratio"): "AdaLoRA's B is one of three factors of its SVD form",
}


def _check_exclusive(lora: LoraConfig) -> None:
    """VeRA's and AdaLoRA's cross-key rules: the LoRA options that have no meaning for them, and AdaLoRA's ranks."""
    v = lora.variant
    values = {"init": (lora.init, lora.init != "kaiming"), "rank_pattern": (lora.rank_pattern, bool(lora.rank_pattern)),
              "alpha_pattern": (lora.alpha_pattern, bool(lora.alpha_pattern)),
              "use_rslora": (lora.use_rslora, lora.use_rslora), "freeze_A": (lora.freeze_A, lora.freeze_A),
              "loraplus_ratio": (lora.loraplus_ratio, lora.loraplus_ratio is not None)}
    for key, (value, bad) in values.items():
        if bad:
            raise InputError(f"Recipe keys 'lora.variant' {v!r} and 'lora.{key}' {value!r} do not go together: "
                             f"{_WHY[v, key]}. Remove lora.{key} for {v}, or use lora.variant lora/dora with it.")
    if v == "adalora" and isinstance(lora.rank, int) and lora.adalora_target_r > lora.rank:
        raise InputError(f"Recipe key 'lora.adalora_target_r' is {lora.adalora_target_r}, above 'lora.rank' "
                         f"{lora.rank} (AdaLoRA's starting rank): AdaLoRA prunes ranks, it never adds them. Set "
                         "lora.adalora_target_r at most lora.rank.")


def recipe_from_dict(data: dict) -> Recipe:
    """Validate a plain mapping into a :class:`Recipe`.

    Raises:
        InputError: unknown key, wrong type or out-of-range value (named by dotted key).
    """
    data = data or {}
    if not isinstance(data, dict):
        raise InputError(f"A recipe must be a mapping of sections, got {data!r}.")
    try:
        return _check(_ADAPTER.validate_python(data))
    except ValidationError as e:
        raise _input_error(e, data) from None


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
        raise InputError(
            f"Recipe file {str(p)!r} does not exist (give the path to a .yaml recipe, e.g. recipes/tiny-cpu.yaml)."
        )
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
