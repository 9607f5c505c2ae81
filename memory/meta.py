"""Config -> transformers model on the meta device -> :class:`~memory.spec.ModelSpec` (needs torch).

The only part of the planner that imports torch and transformers besides the
dry runs (:mod:`memory.probe`). :mod:`memory.spec` calls :func:`build_spec`
when neither the in-process nor the on-disk cache (:mod:`memory.cache`) has
the spec, so a cached plan never imports either.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from quant.errors import InputError

from .spec import LinearInfo, ModelSpec

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
    cls = type(model)
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
        lm_class=cls.__name__,
        supports_sdpa=bool(getattr(cls, "_supports_sdpa", False)),
        sliding_window=_sliding_window(model.config),
    )


def _sliding_window(config) -> int | None:
    """The sliding window some layer of the model attends within, or None.

    The config class's default when config.json omits it (Mistral, Gemma:
    4096); None when Qwen2/Qwen3's ``use_sliding_window`` is off. A config class
    that declares ``layer_types`` applies the window only to its
    ``sliding_attention`` layers; one that does not (Mistral, Phi-3) to every layer.
    """
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    declares_types = any("layer_types" in getattr(k, "__annotations__", {}) for k in type(config).__mro__)
    types = getattr(config, "layer_types", None)
    if declares_types and isinstance(types, (list, tuple)) and "sliding_attention" not in types:
        return None
    return window


def build_spec(facts: dict, name: str) -> ModelSpec:
    """Instantiate ``facts`` on meta and read its shapes (0.4 s for an 80-layer model, plus the imports).

    Raises:
        InputError: as :func:`meta_model`.
    """
    return spec_from_model(meta_model(facts), name, facts)
