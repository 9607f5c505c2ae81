"""Data pipeline: formats, loss masks, packing isolation, clear errors on bad data."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qlora.builtin_models import BUILTIN_MODELS
from qlora.data import IGNORE, load_records, pack_rows, split_eval, tokenize_dataset
from quant import InputError


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tokenize(tok, path, fmt="auto", seq_len=64, **kw):
    ds, src = load_records(path)
    return tokenize_dataset(ds, src, tok, fmt, seq_len, **kw)


def test_chat_loss_only_on_assistant_turns(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6."},
    ]
    (ex,), st = _tokenize(tok, _jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]))
    targets = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    # each turn's targets stop at the end-of-turn token; the newline after it opens the next turn
    assert targets == "4.<|end|>6.<|end|>"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    everything, _ = _tokenize(tok, str(tmp_path / "c.jsonl"), train_on="all")
    assert everything[0].labels == everything[0].input_ids


def test_instruction_records_use_chat_template_and_mask_prompt(tok, tmp_path):
    rows = [{"instruction": "Reverse the words:", "input": "red blue", "output": "blue red"}]
    (ex,), _ = _tokenize(tok, _jsonl(tmp_path / "i.jsonl", rows))
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]) == "blue red<|end|>"
    assert "red blue" in tok.decode(ex.input_ids)


def test_text_csv_parquet_and_save_to_disk(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one two three", "four five"]})
    ds.to_csv(tmp_path / "t.csv")
    ds.to_parquet(tmp_path / "t.parquet")
    ds.save_to_disk(tmp_path / "saved")
    (tmp_path / "t.txt").write_text("one two three\n\nfour five\n")
    for p in ("t.csv", "t.parquet", "saved", "t.txt"):
        exs, st = _tokenize(tok, str(tmp_path / p))
        assert st.examples == 2 and len(exs) == 2
        assert exs[0].labels == exs[0].input_ids and exs[0].input_ids[-1] == tok.eos_token_id


def test_truncation_is_counted(tok, tmp_path):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    exs, st = _tokenize(tok, _jsonl(tmp_path / "t.jsonl", rows), seq_len=32)
    assert st.truncated == 1 and max(len(e.input_ids) for e in exs) == 32


@pytest.mark.parametrize(
    "rows,needle",
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
        ([{"messages": "hello"}], "row 0, field 'messages'"),
        ([{"instruction": "x", "output": ""}], "field 'output'"),
        ([{"foo": 1}], "Cannot tell the format"),
        ([{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}],
         "row 0, field 'messages', turn 0 ('user'): 'content' must be text, got None"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
          {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
         "row 1, field 'messages', turn 0: the role 'wizard' is not one the chat template knows; valid roles: "
         "'assistant', 'system', 'tool' or 'user'"),
    ],
)
def test_bad_records_name_file_row_and_field(tok, tmp_path, rows, needle):
    with pytest.raises(InputError) as e:
        _tokenize(tok, _jsonl(tmp_path / "bad.jsonl", rows))
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_empty_and_missing_data(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"e\.jsonl' is empty \(no rows\)"):
        load_records(str(tmp_path / "e.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="valid extensions"):
        (tmp_path / "x.xml").write_text("<a/>")
        load_records(str(tmp_path / "x.xml"))


def test_undecodable_bytes_and_a_bad_json_line_are_named_by_line(tok, tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin\.jsonl', line 2: byte b'\\xe9' at offset 28 is not UTF-8"):
        load_records(str(tmp_path / "latin.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(InputError, match=r"broken\.jsonl', line 3 is not valid JSON \(Expecting ',' delimiter"):
        load_records(str(tmp_path / "broken.jsonl"))


def test_every_example_too_long_is_an_error(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}] * 3
    with pytest.raises(InputError, match="seq_len=16"):
        _tokenize(tok, _jsonl(tmp_path / "long.jsonl", rows), seq_len=16)


def test_packing_layout_and_no_cross_attention(tok, tmp_path):
    rows = [{"text": t} for t in ("alpha beta gamma", "one two three four five", "red green", "x y z w v u")]
    exs, _ = _tokenize(tok, _jsonl(tmp_path / "p.jsonl", rows))
    packed = pack_rows(exs, 48, tok.pad_token_id, packing=True)
    assert packed["input_ids"].shape[1] == 48 and packed["input_ids"].shape[0] < len(exs)
    # a segment boundary never carries a target, and padding carries none
    assert (packed["labels"][packed["input_ids"] == tok.pad_token_id] == IGNORE).all()

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(
            input_ids=packed["input_ids"][:1], position_ids=packed["position_ids"][:1], use_cache=False
        ).logits[0]
        pos = packed["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist()
        compared = 0
        for i, ex in enumerate(exs[: len(starts) - 1]):  # the last segment is padding
            s = starts[i]
            assert packed["input_ids"][0, s : s + len(ex.input_ids)].tolist() == ex.input_ids
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(out[s : s + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared >= 2  # the second example would see the first if masking leaked


def test_unpacked_rows_hold_one_example_each(tok, tmp_path):
    from transformers.masking_utils import find_packed_sequence_indices

    exs, _ = _tokenize(tok, _jsonl(tmp_path / "u.jsonl", [{"text": "a b"}, {"text": "c d"}]))
    rows = pack_rows(exs, 16, tok.pad_token_id, packing=False)
    assert rows["input_ids"].shape == (2, 16)
    # one example + padding keeps monotone positions: transformers builds no (seq x seq) block mask
    assert torch.equal(rows["position_ids"], torch.arange(16).expand(2, 16))
    assert find_packed_sequence_indices(rows["position_ids"]) is None


def test_eval_split_is_deterministic(tok):
    ds, src = load_records("builtin:tiny-chat")
    exs, _ = tokenize_dataset(ds.select(range(100)), src, tok, "auto", 64)
    a, b = split_eval(exs, 0.1, seed=3)
    c, d = split_eval(exs, 0.1, seed=3)
    assert len(b) == 10 and [e.input_ids for e in b] == [e.input_ids for e in d] and len(a) + len(b) == 100


def test_assistant_targets_end_with_the_end_of_turn_token(tok, tmp_path):
    from qlora.generation import end_of_turn_ids

    eot = end_of_turn_ids(tok)
    assert eot == [tok.convert_tokens_to_ids("<|end|>")]  # the tiny template ends turns with its eos token
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]}]
    (ex,), _ = _tokenize(tok, _jsonl(tmp_path / "c.jsonl", rows))
    # every run of consecutive targets (one assistant turn) ends with an end-of-turn token
    last_of_turn = [lab for k, lab in enumerate(ex.labels)
                    if lab != IGNORE and (k + 1 == len(ex.labels) or ex.labels[k + 1] == IGNORE)]
    assert len(last_of_turn) == 2 and all(t in eot for t in last_of_turn)


def test_a_template_without_an_end_token_gets_eos_appended(tmp_path):
    from qlora.generation import end_of_turn_ids

    plain = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert end_of_turn_ids(plain) == [plain.eos_token_id]
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (ex,), _ = _tokenize(plain, _jsonl(tmp_path / "c.jsonl", rows))
    assert ex.input_ids[-1] == ex.labels[-1] == plain.eos_token_id
    assert plain.decode([t for t in ex.labels if t != IGNORE]) == "yo<|end|>"


def test_examples_remember_their_record_row(tok, tmp_path):
    rows = [{"text": "one"}, {"text": "   "}, {"text": "two"}]  # the blank row is skipped
    exs, _ = _tokenize(tok, _jsonl(tmp_path / "r.jsonl", rows))
    assert [e.row for e in exs] == [0, 2]
    long = [{"text": "word " * 100}]
    (ex,), _ = _tokenize(tok, _jsonl(tmp_path / "l.jsonl", long), seq_len=8)
    assert ex.row == 0 and len(ex.input_ids) == 8  # truncation keeps the row


def test_reading_a_file_shows_no_library_progress_bar_and_keeps_the_callers_setting(tmp_path, capfd,
                                                                                   library_bars_on):
    import datasets
    from transformers.utils import logging as hf_logging

    path = _jsonl(tmp_path / "fresh.jsonl", [{"text": f"row {i}"} for i in range(3)])  # new file: datasets builds it
    ds, _ = load_records(path)
    assert len(ds) == 3 and "Generating train split" not in capfd.readouterr().err
    # switched back on for the caller's own use
    assert not datasets.are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()
