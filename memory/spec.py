"""Model specs: exact module shapes of a causal LM, without loading weights.

A :class:`ModelSpec` is derived by instantiating the transformers model class
from its config on the ``meta`` device (shapes and dtypes, no storage) and
walking its modules. No parameter formulas are written by hand, so grouped-
query attention, tied embeddings, odd MLP sizes, Gemma's ``head_dim``,
Phi-3's fused ``qkv_proj``/``gate_up_proj`` and Qwen's q/k/v biases come out
as the model defines them. Which linears stay 16-bit is decided by
``quant.model.skipped_names`` -- the same function quantization uses.

Sources: a catalog name (:mod:`memory.catalog`), a local ``config.json`` or
a model folder holding one. Recipes are the trainer's (``qlora``), so they are
planned on its side: ``qlora plan --model RECIPE.yaml`` or
``qlora.train.plan.plan_recipe``.

Building a spec for Llama-3.1-70B (80 layers) takes about 0.4 s on a laptop
CPU; results are cached per config, so repeated plans pay it once.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quant.errors import InputError

from .catalog import DEFAULT_MODEL, catalog_config, known_models, resolve_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearInfo:
    """One ``nn.Linear`` of the model.

    Attributes:
        name: qualified module name (``model.layers.0.self_attn.q_proj``).
        short: the name inside its decoder layer (``self_attn.q_proj``), or
            ``name`` for linears outside the layer stack.
        layer: decoder-layer index, or None.
        in_features, out_features: weight shape is ``(out, in)``.
        bias: has a bias (kept 16-bit even when the weight is quantized).
        quantized: becomes NF4/FP4 (False for the output head and skips).
    """

    name: str
    short: str
    layer: int | None
    in_features: int
    out_features: int
    bias: bool
    quantized: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a causal LM, as its transformers class builds them.

    Attributes:
        name: catalog name, or the path it was read from.
        model_type: transformers ``model_type`` (``llama``, ``qwen2``...).
        config_json: the config facts as canonical JSON (rebuilds the config).
        num_layers, hidden_size, vocab_size: from the config.
        linears: every ``nn.Linear``, in module order.
        frozen_16bit: parameter counts that stay in 16 bits, by group
            (``embeddings``, ``lm_head``, ``norms``, ``linear biases``,
            ``other``); a tied head is counted once, under embeddings.
        buffer_bytes: persistent non-parameter buffers (RoPE tables...).
        tied_embeddings: the output head shares the input embedding.
        layer_types: attention type per decoder layer (``full_attention``,
            ``sliding_attention``); all ``full_attention`` if the config has none.
        total_params: all parameters, tied ones once (the published size).
    """

    name: str
    model_type: str
    config_json: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    linears: tuple[LinearInfo, ...]
    frozen_16bit: dict[str, int] = field(hash=False)
    buffer_bytes: int
    tied_embeddings: bool
    layer_types: tuple[str, ...]
    total_params: int

    @property
    def config(self) -> dict:
        """A fresh copy of the config facts."""
        return json.loads(self.config_json)

    @functools.cached_property
    def quantized_params(self) -> int:
        """Elements of all weights stored in 4 bits."""
        return sum(lin.numel for lin in self.linears if lin.quantized)

    def __hash__(self) -> int:
        # The planner's caches look a spec up several times per estimate; hashing every
        # LinearInfo each time cost a fifth of an estimate. Equal specs have equal names
        # and configs (both are compared fields), so this hash agrees with ==.
        return hash((self.name, self.config_json))

    @property
    def frozen_16bit_params(self) -> int:
        return sum(self.frozen_16bit.values())

    def layer_linears(self, layer: int = 0) -> tuple[LinearInfo, ...]:
        """The linears of decoder layer ``layer``."""
        return tuple(lin for lin in self.linears if lin.layer == layer)

    def linear_shorts(self) -> tuple[str, ...]:
        """Distinct in-layer linear names (``self_attn.q_proj``...), in module order."""
        seen: dict[str, None] = {}
        for lin in self.linears:
            if lin.layer is not None:
                seen.setdefault(lin.short, None)
        return tuple(seen)


# ---------------------------------------------------------------------------- config -> model


def build_config(facts: dict):
    """A transformers ``PretrainedConfig`` from config.json facts.

    Raises:
        InputError: missing or unknown ``model_type``, or facts the config
            class rejects.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    facts = dict(facts)
    model_type = facts.pop("model_type", None)
    if not model_type:
        raise InputError("The config has no 'model_type'; a Hugging Face config.json names its architecture there.")
    if model_type not in CONFIG_MAPPING:
        raise InputError(
            f"model_type {model_type!r} is unknown to the installed transformers; it cannot be instantiated, "
            "so its shapes cannot be derived. Use a causal LM architecture transformers ships "
            "(llama, mistral, qwen2, qwen3, gemma2, phi3...)."
        )
    for key in ("auto_map", "quantization_config", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        facts.pop(key, None)
    try:
        return CONFIG_MAPPING[model_type](**facts)
    except (TypeError, ValueError) as e:
        raise InputError(f"The {model_type!r} config is invalid for the installed transformers: {e}") from None


def causal_lm_class(config):
    """The ``*ForCausalLM`` class for ``config``.

    Raises:
        InputError: the architecture is not a causal language model.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    # Encoders with an optional LM head (BertLMHeadModel...) and GPT-2-style
    # Conv1D models are in that mapping too; the decoder-only LMs qlora
    # trains are the ``*ForCausalLM`` classes.
    if cls_name is None or not cls_name.endswith("ForCausalLM") or getattr(config, "is_encoder_decoder", False):
        what = f"transformers class {cls_name}" if cls_name else "transformers has no causal-LM class for it"
        raise InputError(
            f"The config describes a {model_type!r} model, which is not a decoder-only causal language model "
            f"({what}). qlora fine-tunes decoder-only causal LMs such as llama, mistral, qwen2, qwen3, gemma2 or phi3."
        )
    return AutoModelForCausalLM._model_mapping[type(config)]


def meta_model(facts: dict, num_layers: int | None = None, attn_implementation: str = "eager") -> nn.Module:
    """Instantiate the causal LM for ``facts`` on the meta device, in bf16.

    Args:
        facts: config.json facts.
        num_layers: build only this many decoder layers (per-layer config
            lists such as ``layer_types`` are cut to match).
        attn_implementation: ``'sdpa'`` or ``'eager'`` (shapes do not depend
            on it; every architecture supports ``'eager'``).

    Raises:
        InputError: as :func:`build_config` and :func:`causal_lm_class`;
            an attention implementation the architecture does not support.
    """
    facts = dict(facts)
    if num_layers is not None:
        facts["num_hidden_layers"] = num_layers
        if isinstance(facts.get("layer_types"), list):
            facts["layer_types"] = facts["layer_types"][:num_layers]
    config = build_config(facts)
    if num_layers is not None and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    cls = causal_lm_class(config)
    try:
        with torch.device("meta"):
            return cls._from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    except ValueError as e:  # e.g. Gemma-2 has no sdpa path in transformers 5 (logit soft-capping)
        raise InputError(
            f"{cls.__name__} cannot use attn_implementation={attn_implementation!r} in the installed "
            f"transformers: {str(e).splitlines()[0]}"
        ) from None


# ---------------------------------------------------------------------------- model -> spec


def _layer_of(name: str, layers_prefix: str) -> tuple[int | None, str]:
    if name.startswith(layers_prefix):
        idx, _, rest = name[len(layers_prefix):].partition(".")
        if idx.isdigit():
            return int(idx), rest
    return None, name


def layers_prefix(model: nn.Module) -> str:
    """Qualified prefix of the decoder-layer ModuleList (``model.layers.``)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > best[1]):
            best = (name, len(mod))
    if best is None:
        raise InputError("The model has no stack of decoder layers (no nn.ModuleList); it is not a decoder-only LM.")
    return best[0] + "."


def spec_from_model(model: nn.Module, name: str, facts: dict) -> ModelSpec:
    """Read the shapes of an instantiated (meta or real) causal LM."""
    from quant.model import linear_names, skipped_names

    prefix = layers_prefix(model)
    keep16 = skipped_names(model)
    modules = dict(model.named_modules())
    linears = []
    for lname in linear_names(model):
        mod = modules[lname]
        layer, short = _layer_of(lname, prefix)
        linears.append(
            LinearInfo(
                lname, short, layer, mod.in_features, mod.out_features, mod.bias is not None, lname not in keep16
            )
        )
    quantized_weights = {id(modules[lin.name].weight) for lin in linears if lin.quantized}
    quantized_biases = {id(modules[lin.name].bias) for lin in linears if lin.quantized and lin.bias}
    head = model.get_output_embeddings()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"embeddings": 0, "lm_head": 0, "norms": 0, "linear biases": 0, "other": 0}
    owner = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
    total = 0
    for _pname, p in model.named_parameters():  # named_parameters yields a tied weight once
        n = p.numel()
        total += n
        if id(p) in quantized_weights:
            continue
        if id(p) in quantized_biases:
            groups["linear biases"] += n
        elif id(p) in embeddings:
            groups["embeddings"] += n
        elif head is not None and p is head.weight:
            groups["lm_head"] += n
        elif "norm" in owner.get(id(p), "").lower():
            groups["norms"] += n
        else:
            groups["other"] += n
    buffer_bytes = sum(b.numel() * b.element_size() for _n, b in model.named_buffers())
    tied = head is not None and any(head.weight is m.weight for m in model.modules() if isinstance(m, nn.Embedding))
    n_layers = model.config.num_hidden_layers
    types = getattr(model.config, "layer_types", None)
    listed = isinstance(types, (list, tuple)) and len(types) == n_layers
    layer_types = tuple(types) if listed else ("full_attention",) * n_layers
    return ModelSpec(
        name=name,
        model_type=model.config.model_type,
        config_json=json.dumps(facts, sort_keys=True),
        num_layers=n_layers,
        hidden_size=model.config.hidden_size,
        vocab_size=model.config.vocab_size,
        linears=tuple(linears),
        frozen_16bit=groups,
        buffer_bytes=buffer_bytes,
        tied_embeddings=tied,
        layer_types=layer_types,
        total_params=total,
    )


@functools.lru_cache(maxsize=64)
def _spec_cached(name: str, config_json: str) -> ModelSpec:
    facts = json.loads(config_json)
    model = meta_model(facts)
    return spec_from_model(model, name, facts)


def spec_from_config(facts: dict, name: str = "custom") -> ModelSpec:
    """A spec from config.json facts (a dict). Cached per (name, facts).

    Raises:
        InputError: unknown/missing model_type, not a causal LM, invalid facts.
    """
    if not isinstance(facts, dict):
        raise InputError(f"A model config must be a JSON object, got {type(facts).__name__}.")
    return _spec_cached(name, json.dumps(facts, sort_keys=True))


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read model config {str(path)!r}: {e}.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{str(path)!r} is not valid JSON ({e}); expected a Hugging Face config.json.") from None


def load_spec(model: str = DEFAULT_MODEL) -> ModelSpec:
    """A spec from a catalog name, a ``config.json`` path or a model folder.

    A name that exists as a local path wins over the catalog.

    Raises:
        InputError: not a catalog name nor a readable config; a folder
            without config.json; a recipe YAML (plan it with ``qlora plan
            --model RECIPE.yaml``); not a causal LM.
    """
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"--model needs a catalog name, a config.json or a model folder, got {model!r}.")
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise InputError(f"Model folder {model!r} has no config.json; a Hugging Face model folder needs one.")
        return spec_from_config(_read_config(cfg), name=str(path))
    if path.suffix.lower() in (".yaml", ".yml"):
        raise InputError(
            f"{model!r} is a recipe, not a model config. memory.load_spec reads a catalog name, a config.json or a "
            "model folder; a recipe is planned with its own settings by the trainer's side: "
            f"`qlora plan --model {model}` (or qlora.train.plan.plan_recipe in Python)."
        )
    if path.is_file():
        return spec_from_config(_read_config(path), name=str(path))
    if resolve_name(model) is None and ("/" in model or model.endswith(".json")) and not _looks_like_repo(model):
        raise InputError(
            f"Model path {model!r} does not exist. Give a local config.json or model folder, "
            f"or a built-in model name such as {known_models()[2]!r}."
        )
    key, facts = catalog_config(model)
    return spec_from_config(facts, name=key)


def _looks_like_repo(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))
