"""Tiny config.json facts for each architecture family the planner supports.

Sizes are small but exercise what real models do: grouped-query attention,
tied embeddings, q/k/v biases (Qwen2), Gemma-2's head_dim, soft-capping and
sliding/full layer alternation, Phi-3's fused qkv/gate_up projections,
Qwen3's q/k norms, and MLP widths that are not multiples of anything.
"""

BASE = dict(
    hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
)

ARCHS = {
    "llama": dict(BASE, model_type="llama"),
    "llama-odd": dict(
        BASE, model_type="llama", hidden_size=96, intermediate_size=333, num_attention_heads=3, num_key_value_heads=1
    ),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(BASE, model_type="mistral", sliding_window=None),
    "gemma2": dict(
        BASE, model_type="gemma2", head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
    ),
    "phi3": dict(BASE, model_type="phi3", num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, tie_word_embeddings=True),
}
