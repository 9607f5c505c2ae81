#!/usr/bin/env python3
"""Regenerate the tiny assets shipped in qlora/assets/ (deterministic).

- data/tiny-chat.jsonl     chat records ({"messages": [...]}) of small, learnable
                           tasks (arithmetic, reversal, capitals, case, counting)
- data/tiny-text.txt       the same facts as plain text, for continued pre-training
- tiny-llama/tokenizer.*   a byte-level BPE tokenizer trained on that data, with a
                           chat template and special tokens
- tiny-llama/config.json   a 4-layer, 128-hidden Llama config sized for 2 CPU cores

Run: .venv/bin/python scripts/make_tiny_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qlora" / "assets"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "India": "New Delhi",
    "China": "Beijing", "Brazil": "Brasilia", "Mexico": "Mexico City", "Turkey": "Ankara", "Cuba": "Havana",
}
WORDS = (
    "apple river stone cloud green quick lamp tiger ocean maple silver paper garden window "
    "orange violet rocket candle forest planet bridge summer winter yellow purple castle"
).split()
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _example(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["add", "sub", "rev", "cap", "upper", "count", "next"])
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == "sub":
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == "rev":
        ws = rng.sample(WORDS, rng.randint(2, 5))
        return "Reverse the words: " + " ".join(ws), " ".join(reversed(ws))
    if kind == "cap":
        c = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
    if kind == "upper":
        ws = rng.sample(WORDS, rng.randint(1, 4))
        return "Write in capitals: " + " ".join(ws), " ".join(ws).upper()
    if kind == "count":
        ws = rng.sample(WORDS, rng.randint(1, 7))
        return "How many words are in: " + " ".join(ws), f"There are {len(ws)} words."
    n = rng.randint(0, 997)
    return f"Which number comes after {n}?", f"After {n} comes {n + 1}."


def make_data(n: int = 2400, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        q, a = _example(rng)
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.15:
            msgs.insert(0, {"role": "system", "content": "You are a concise assistant."})
        records.append({"messages": msgs})
    return records


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(out)


def main() -> None:
    data_dir, model_dir = ASSETS / "data", ASSETS / "tiny-llama"
    data_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    records = make_data()
    with open(data_dir / "tiny-chat.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    text_lines = [f"{m['messages'][-2]['content']} {m['messages'][-1]['content']}" for m in records]
    (data_dir / "tiny-text.txt").write_text("\n".join(text_lines) + "\n")
    train_tokenizer(text_lines + list(SPECIAL), model_dir)
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bfloat16",
    )
    cfg.save_pretrained(model_dir)
    print(f"wrote {len(records)} records, vocab {len(tok)}, to {ASSETS}")


if __name__ == "__main__":
    main()
