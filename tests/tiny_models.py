"""Tiny Llama/Mistral/Qwen2/Gemma-style causal LMs and the transformers + bitsandbytes oracle.

Shapes are chosen to exercise the format: 128x256 matrices have 512 blocks
(two nested 256-blocks), GQA gives 64-row k/v projections, Qwen2 has q/k/v
biases and Gemma ties lm_head to the embeddings.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

ARCHS = ("llama", "mistral", "qwen2", "gemma")
VOCAB = 256

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


def tiny_config(arch: str, **overrides):
    kw = dict(_COMMON, **overrides)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=16, **kw)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "gemma":
        return GemmaConfig(head_dim=32, **dict(kw, num_key_value_heads=1))
    raise ValueError(arch)


def save_tiny(arch: str, path: Path, dtype=torch.bfloat16, seed: int = 0, **save_kw) -> Path:
    """Build ``arch`` from its config with random (non-trivial) weights and save_pretrained it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms random too, so every tensor matters
            p.normal_(0.0, 0.05)
    model.save_pretrained(str(path), **save_kw)
    return path


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, **kw) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16, **kw,
    )


def reference_path(model):
    """Make bitsandbytes compute ``F.linear(x, dequantize(W))`` on this CPU.

    In eval mode on CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit``
    repacks the weight for a fused CPU kernel and rounds the absmax to
    bfloat16 first (``functional._convert_weight_packed_for_cpu``), an
    approximation specific to that CPU path. Without this switch the oracle
    would change with the test machine's CPU flags; with it, bitsandbytes runs
    the dequantize-then-matmul arithmetic it uses for training, which is the
    arithmetic of the format and of ``NF4Linear``.
    """
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def transformers_4bit(path: Path, config: BitsAndBytesConfig | None = None, **kw):
    """transformers + bitsandbytes loading (and, for a 16-bit dir, quantizing) ``path`` on the CPU."""
    if config is not None:  # an explicit quantization_config=None would hide the file's own
        kw["quantization_config"] = config
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", **kw)
    return reference_path(model)


def input_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits
