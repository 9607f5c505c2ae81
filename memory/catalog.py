"""Built-in architectures, stored as the facts of their ``config.json``.

Each entry is the subset of the published ``config.json`` that decides the
model's module shapes and its forward pass (sizes, head layout, tying,
biases, activation, soft-capping, sliding windows), with the values copied
from the checkpoints' configs. Nothing here is a parameter count: specs are
derived by instantiating the transformers class from these facts on the
meta device (:mod:`memory.spec`).

Omitted on purpose: token ids, initializer ranges and long-context RoPE
factor tables (Phi-3.5's ``longrope`` lists). None of them changes a shape
or an activation size.

Instruct/chat variants share their base model's architecture, so
``llama-3.1-8b-instruct`` or ``meta-llama/Llama-3.1-8B-Instruct`` resolve to
the same entry.

Not included: Mixtral-8x7B and other mixture-of-experts models. transformers
5 stores their experts as fused 3-D parameters, which ``quant.quantize_model``
(``nn.Linear`` only) leaves in 16 bits, and their activation memory depends
on the routing of each batch; an honest plan needs both handled first.
"""

from __future__ import annotations

import copy
import difflib

from quant.errors import InputError, choices

DEFAULT_MODEL = "llama-3.1-8b"

_LLAMA3_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _llama(hidden, inter, layers, heads, kv, tied, rope_factor, head_dim=None, vocab=128256):
    d = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=rope_factor),
    }
    if head_dim is not None:
        d["head_dim"] = head_dim
    return d


def _qwen2(hidden, inter, layers, heads, kv, tied, vocab, max_pos):
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
    }


def _qwen3(hidden, inter, layers, heads, kv, tied):
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
    }


def _gemma2(hidden, inter, layers, heads, kv, head_dim, query_scalar):
    return {
        "model_type": "gemma2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": 256000,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    }


def _gemma3_text(hidden, inter, layers, heads, kv, sliding_window, max_pos):
    return {
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 256,
        "vocab_size": 262144,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,  # full-attention layers
        "rope_local_base_freq": 10000.0,  # sliding layers
        "rope_scaling": None,
        "query_pre_attn_scalar": 256,
        "sliding_window": sliding_window,
        "sliding_window_pattern": 6,  # 5 sliding layers, then 1 full
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def _phi3(max_pos, sliding_window):
    return {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "sliding_window": sliding_window,
        "pad_token_id": 32000,
    }


def _mistral(hidden, inter, layers, heads, kv, vocab, head_dim=None, max_pos=32768, sliding_window=None,
             rope_theta=1000000.0):
    d = {
        "model_type": "mistral",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
    }
    if head_dim is not None:
        d["head_dim"] = head_dim
    return d


# name -> (config.json facts, Hugging Face repository it describes)
_MODELS: dict[str, tuple[dict, str]] = {
    "llama-3.2-1b": (_llama(2048, 8192, 16, 32, 8, True, 32.0, head_dim=64), "meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": (_llama(3072, 8192, 28, 24, 8, True, 32.0, head_dim=128), "meta-llama/Llama-3.2-3B"),
    "llama-3.1-8b": (_llama(4096, 14336, 32, 32, 8, False, 8.0), "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": (_llama(8192, 28672, 80, 64, 8, False, 8.0), "meta-llama/Llama-3.1-70B"),
    "llama-3.3-70b": (_llama(8192, 28672, 80, 64, 8, False, 8.0), "meta-llama/Llama-3.3-70B-Instruct"),
    "mistral-7b-v0.1": (
        _mistral(4096, 14336, 32, 32, 8, 32000, sliding_window=4096, rope_theta=10000.0), "mistralai/Mistral-7B-v0.1"
    ),
    "mistral-7b-v0.3": (_mistral(4096, 14336, 32, 32, 8, 32768), "mistralai/Mistral-7B-v0.3"),
    "mistral-nemo-12b": (
        _mistral(5120, 14336, 40, 32, 8, 131072, head_dim=128, max_pos=1024000),
        "mistralai/Mistral-Nemo-Base-2407",
    ),
    "qwen2.5-0.5b": (_qwen2(896, 4864, 24, 14, 2, True, 151936, 32768), "Qwen/Qwen2.5-0.5B"),
    "qwen2.5-1.5b": (_qwen2(1536, 8960, 28, 12, 2, True, 151936, 131072), "Qwen/Qwen2.5-1.5B"),
    "qwen2.5-3b": (_qwen2(2048, 11008, 36, 16, 2, True, 151936, 32768), "Qwen/Qwen2.5-3B"),
    "qwen2.5-7b": (_qwen2(3584, 18944, 28, 28, 4, False, 152064, 131072), "Qwen/Qwen2.5-7B"),
    "qwen2.5-14b": (_qwen2(5120, 13824, 48, 40, 8, False, 152064, 131072), "Qwen/Qwen2.5-14B"),
    "qwen2.5-32b": (_qwen2(5120, 27648, 64, 40, 8, False, 152064, 131072), "Qwen/Qwen2.5-32B"),
    "qwen2.5-72b": (_qwen2(8192, 29568, 80, 64, 8, False, 152064, 131072), "Qwen/Qwen2.5-72B"),
    "qwen3-0.6b": (_qwen3(1024, 3072, 28, 16, 8, True), "Qwen/Qwen3-0.6B"),
    "qwen3-1.7b": (_qwen3(2048, 6144, 28, 16, 8, True), "Qwen/Qwen3-1.7B"),
    "qwen3-4b": (_qwen3(2560, 9728, 36, 32, 8, True), "Qwen/Qwen3-4B"),
    "qwen3-8b": (_qwen3(4096, 12288, 36, 32, 8, False), "Qwen/Qwen3-8B"),
    "qwen3-14b": (_qwen3(5120, 17408, 40, 40, 8, False), "Qwen/Qwen3-14B"),
    "qwen3-32b": (_qwen3(5120, 25600, 64, 64, 8, False), "Qwen/Qwen3-32B"),
    "gemma-2-2b": (_gemma2(2304, 9216, 26, 8, 4, 256, 256), "google/gemma-2-2b"),
    "gemma-2-9b": (_gemma2(3584, 14336, 42, 16, 8, 256, 256), "google/gemma-2-9b"),
    "gemma-2-27b": (_gemma2(4608, 36864, 46, 32, 16, 128, 144), "google/gemma-2-27b"),
    # The text-only Gemma-3 (Gemma3ForCausalLM); 4B and larger are image-text models (Gemma3ForConditionalGeneration).
    "gemma-3-1b": (_gemma3_text(1152, 6912, 26, 4, 1, 512, 32768), "google/gemma-3-1b-pt"),
    "phi-3-mini-4k": (_phi3(4096, 2047), "microsoft/Phi-3-mini-4k-instruct"),
    "phi-3.5-mini": (_phi3(131072, 262144), "microsoft/Phi-3.5-mini-instruct"),
    "tinyllama-1.1b": (
        dict(_llama(2048, 5632, 22, 32, 4, False, 1.0, vocab=32000), rope_theta=10000.0, rope_scaling=None,
             max_position_embeddings=2048),
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    ),
    "smollm2-135m": (
        dict(_llama(576, 1536, 30, 9, 3, True, 1.0, vocab=49152), rope_theta=100000.0, rope_scaling=None,
             max_position_embeddings=8192),
        "HuggingFaceTB/SmolLM2-135M",
    ),
    "smollm2-360m": (
        dict(_llama(960, 2560, 32, 15, 5, True, 1.0, vocab=49152), rope_theta=100000.0, rope_scaling=None,
             max_position_embeddings=8192),
        "HuggingFaceTB/SmolLM2-360M",
    ),
    "smollm2-1.7b": (
        dict(_llama(2048, 8192, 24, 32, 32, True, 1.0, vocab=49152), rope_theta=130000.0, rope_scaling=None,
             max_position_embeddings=8192),
        "HuggingFaceTB/SmolLM2-1.7B",
    ),
}

_SUFFIXES = ("-instruct", "-it", "-pt", "-chat", "-base")


def known_models() -> list[str]:
    """Catalog names, in catalog order."""
    return list(_MODELS)


def _normalize(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = key.rsplit("/", 1)[-1]  # "meta-llama/Llama-3.1-8B" -> "llama-3.1-8b"
    key = key.replace("meta-llama-", "llama-")
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


_REPO_INDEX = {_normalize(repo): name for name, (_, repo) in _MODELS.items()}
# Family names people type without a version: the newest catalog entry of that family.
_ALIASES = {"mistral-7b": "mistral-7b-v0.3", "phi-3-mini": "phi-3-mini-4k", "phi-3.5": "phi-3.5-mini"}


def resolve_name(name: str) -> str | None:
    """The catalog key for ``name`` (catalog key, HF repo id or instruct variant), or None."""
    key = _normalize(name)
    if key in _MODELS:
        return key
    return _REPO_INDEX.get(key) or _ALIASES.get(key)


def catalog_config(name: str) -> tuple[str, dict]:
    """``(catalog name, a fresh copy of its config.json facts)``.

    Raises:
        InputError: ``name`` is not in the catalog (the message lists the
            closest names and all valid ones).
    """
    key = resolve_name(name)
    if key is None:
        close = difflib.get_close_matches(_normalize(name), list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {choices(close)}?" if close else ""
        raise InputError(
            f"Unknown model {name!r}: not in the built-in catalog and not a local config.json or model "
            f"folder.{hint} Built-in models: {choices(known_models())}."
        )
    return key, copy.deepcopy(_MODELS[key][0])


def catalog_repo(name: str) -> str:
    """The Hugging Face repository a catalog entry describes."""
    return _MODELS[name][1]
