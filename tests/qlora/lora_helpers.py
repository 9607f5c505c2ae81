"""Tiny causal LMs built from configs, and helpers shared by the LoRA-core tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from layers import DoRALinear
from qlora.lora.surgery import lora_modules

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v have biases
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),  # lm_head tied to the embeddings
    "phi3": lambda: Phi3Config(**_COMMON),  # fused qkv_proj and gate_up_proj
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),  # per-head q_norm and k_norm
}


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialized 2-layer, hidden-64 causal LM in eval mode (eager attention, random biases)."""
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # transformers zero-initializes biases; random ones make bias handling testable
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model.to(dtype).eval()


def batch(seed: int = 1, n: int = 2, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


@torch.no_grad()
def randomize_adapters(model, seed: int = 2, std_b: float = 0.05) -> None:
    """Give every adapter a random, non-zero B (and perturb A and DoRA magnitudes) so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        if m.lora_A is None:
            continue
        b = m.lora_B.weight
        b.copy_(torch.randn(b.shape, generator=g) * std_b)
        a = m.lora_A.weight
        a.add_(torch.randn(a.shape, generator=g) * 0.01)
        if isinstance(m, DoRALinear):
            mv = m.lora_magnitude_vector
            mv.mul_(1 + 0.1 * torch.randn(mv.shape, generator=g))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits.float()
