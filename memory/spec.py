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

Building a spec (:mod:`memory.meta`) imports torch and transformers and takes
about 5 s on a 2-core machine; specs are therefore kept on disk
(:mod:`memory.cache`, shipped for the catalog), and reading one back is
about a millisecond, with no torch import.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from quant.errors import InputError

from .cache import cached
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
        lm_class: the transformers class (``LlamaForCausalLM``).
        supports_sdpa: that class has an sdpa attention path in the installed transformers.
        sliding_window: the window some layer attends within (sliding-window attention), or None.
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
    lm_class: str
    supports_sdpa: bool
    sliding_window: int | None

    @property
    def config(self) -> dict:
        """A fresh copy of the config facts."""
        return json.loads(self.config_json)

    @property
    def context(self) -> int | None:
        """The model's context in positions (``max_position_embeddings``, GPT-2's ``n_positions``), None if unsaid."""
        config = self.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
        return None

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


    def to_dict(self) -> dict:
        """JSON-able fields (:meth:`from_dict` inverts it; the on-disk cache stores this)."""
        out = dataclasses.asdict(self)
        out["linears"] = [dataclasses.astuple(lin) for lin in self.linears]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields["linears"] = tuple(LinearInfo(*row) for row in data["linears"])
        fields["layer_types"] = tuple(data["layer_types"])
        return cls(**fields)


@functools.lru_cache(maxsize=64)
def _spec_cached(name: str, config_json: str) -> ModelSpec:
    def build() -> dict:
        import torch

        from .meta import build_spec  # torch + transformers: only when no cache has the spec

        with torch.random.fork_rng(devices=[]):  # planning never moves the trainer's random stream
            return build_spec(json.loads(config_json), name).to_dict()

    data = cached("spec", {"config": config_json}, build)
    return ModelSpec.from_dict(dict(data, name=name))


def spec_from_config(facts: dict, name: str = "custom") -> ModelSpec:
    """A spec from config.json facts (a dict). Cached per (name, facts).

    Raises:
        InputError: unknown/missing model_type, not a causal LM, invalid facts.
    """
    if not isinstance(facts, dict):
        raise InputError(f"A model config must be a JSON object, got {type(facts).__name__}.")
    _check_sizes(facts, name)
    return _spec_cached(name, json.dumps(facts, sort_keys=True))


# The sizes a plan is made of, with the names other architectures give them (GPT-2's n_embd, T5-style
# d_model). transformers fills a missing one with its class default (LlamaConfig: a 7B model), so a config
# without them would be planned as a model nobody asked for.
_SIZES = {"hidden_size": ("hidden_size", "n_embd", "d_model"),
          "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
          "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
          "vocab_size": ("vocab_size",)}


def _check_sizes(facts: dict, name: str) -> None:
    """Refuse a config that leaves a size to transformers' defaults (multimodal configs keep them in text_config).

    Raises:
        InputError: naming the missing fields.
    """
    text = facts.get("text_config") if isinstance(facts.get("text_config"), dict) else {}
    missing = ["model_type"] * ("model_type" not in facts)
    missing += [k for k, names in _SIZES.items() if not any(n in facts or n in text for n in names)]
    if missing:
        raise InputError(
            f"Model config {name!r} does not give {', '.join(missing)}; a plan needs the model's type and sizes, "
            "and transformers would fill missing sizes with its defaults. Use the model's own config.json, "
            "which lists them."
        )


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
