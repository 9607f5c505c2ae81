"""Generation: end-of-turn tokens, prompt rendering, batched greedy == one at a time, stopping, streaming."""

import pytest
import torch
from transformers import AutoTokenizer, TextStreamer

from qlora.builtin_models import BUILTIN_MODELS, resolve_model_dir
from qlora.generation import end_of_turn_ids, generate, prompt_ids
from quant import InputError
from quant.loading import load_quantized_model

PROMPTS = ["hi there", "What is 2 plus 2, and what is 3 plus 3?", "x", "Tell me about the weather today."]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])


@pytest.fixture(scope="module")
def model():
    # fp32 throughout: the random tiny model's logits are nearly tied, and bf16 rounding (which depends on
    # the padding) would flip greedy choices; fp32 compares the batching itself
    return load_quantized_model(resolve_model_dir("builtin:tiny-llama"), "cpu", dtype=torch.float32,
                                compute_dtype=torch.float32)


def test_end_of_turn_ids_finds_the_templates_turn_end(tok):
    assert end_of_turn_ids(tok) == [tok.eos_token_id]  # the tiny template ends turns with <|end|>, its eos
    other = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    # the turn ends with a special token other than eos, after a newline
    other.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n<|eos|>\n' }}{% endfor %}"
    )
    assert end_of_turn_ids(other) == [other.eos_token_id, other.convert_tokens_to_ids("<|eos|>")]
    other.chat_template = "{% for m in messages %}{{ m['content'] + ' END' }}{% endfor %}"  # plain text: no token
    assert end_of_turn_ids(other) == [other.eos_token_id]


def test_prompt_ids_use_the_chat_template_or_raw_text(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tok, "hi") == tok(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, [{"role": "user", "content": "hi"}]) == prompt_ids(tok, "hi")
    assert tok.decode(prompt_ids(tok, "hi")).endswith("<|assistant|>\n")
    raw = prompt_ids(tok, "hi", chat=False)
    assert raw[0] == tok.bos_token_id and tok.decode(raw[1:]) == "hi"
    with pytest.raises(InputError, match="chat template"):
        prompt_ids(tok, [{"role": "user", "content": "hi"}], chat=False)


def test_batched_greedy_equals_one_at_a_time(model, tok):
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)  # different lengths: batches are left-padded
    alone = [generate(model, tok, [i], max_new_tokens=12)[0] for i in ids]
    assert generate(model, tok, ids, max_new_tokens=12, batch_size=4) == alone
    assert generate(model, tok, ids, max_new_tokens=12, batch_size=3) == alone
    assert all(alone)


def test_left_padded_rows_get_positions_from_zero_and_the_cache_is_used(model, tok):
    ids = [prompt_ids(tok, "hi"), prompt_ids(tok, PROMPTS[1])]
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["input_ids"].shape, kw.get("position_ids"))), with_kwargs=True
    )
    model.config.use_cache = False  # as training leaves it: generate still asks for the cache
    try:
        generate(model, tok, ids, max_new_tokens=3)
    finally:
        hook.remove()
        model.config.use_cache = True
    (shape, pos), (next_shape, next_pos) = seen[0], seen[1]
    short, width = len(ids[0]), shape[1]
    # prompts are batched longest first: row 0 is the long one, row 1 the padded short one
    assert pos[0].tolist() == list(range(width))
    assert pos[1, width - short:].tolist() == list(range(short))  # the padded row starts at position 0
    assert next_shape == (2, 1) and next_pos[:, 0].tolist() == [width, short]  # one new token per step: cached


def test_generation_stops_at_an_end_of_turn_token(model, tok):
    ids = prompt_ids(tok, PROMPTS[1])
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    stop = free[4]
    cut = free.index(stop)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]  # stop ids also come from the model
    try:
        reply = generate(model, tok, [ids], max_new_tokens=10)[0]
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert reply == tok.decode(free[:cut], skip_special_tokens=True)


class _Capture(TextStreamer):
    def __init__(self, tok):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.text = ""

    def on_finalized_text(self, text, stream_end=False):
        self.text += text


def test_streaming_one_prompt(model, tok):
    ids = prompt_ids(tok, "hi")
    streamer = _Capture(tok)
    reply = generate(model, tok, [ids], max_new_tokens=8, streamer=streamer)[0]
    assert streamer.text == reply
    with pytest.raises(InputError, match="one reply at a time"):
        generate(model, tok, [ids, ids], streamer=_Capture(tok))


def test_mode_is_restored_and_bad_arguments_are_input_errors(model, tok):
    model.train()
    try:
        generate(model, tok, [prompt_ids(tok, "hi")], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    for kw in (dict(max_new_tokens=0), dict(batch_size=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(InputError):
            generate(model, tok, [[1, 2]], **kw)
    with pytest.raises(InputError, match="at least one token"):
        generate(model, tok, [[]])
