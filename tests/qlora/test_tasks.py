"""The task metric: examples from records, JSON-aware scoring, greedy evaluation on the tiny model."""

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from qlora.builtin_models import BUILTIN_MODELS, resolve_model_dir
from qlora.data import ASSETS, load_records
from qlora.generation import generate, prompt_ids
from qlora.tasks import TaskExample, TaskScore, evaluate_task, score, task_examples
from quant import InputError
from quant.loading import load_quantized_model

REF = '{"name": "Sana Silva", "age": 31, "city": "Athens"}'


def test_json_references_compare_after_parsing():
    assert score('{"city":"Athens","age":31,"name":"Sana Silva"}', REF) == (True, True)  # order, spacing
    assert score(f"  {REF}\n", REF) == (True, True)
    assert score('{"name": "Sana Silva", "age": "31", "city": "Athens"}', REF) == (False, True)  # a string 31
    assert score('{"name": "Sana Silva", "age": 31', REF) == (False, False)  # cut off: not JSON
    assert score(f"Here it is: {REF}", REF) == (False, False)
    assert score("[1, 2]", "[1,2]") == (True, True)


def test_other_references_compare_as_stripped_strings():
    assert score(" 74 plus 4 is 78.\n", "74 plus 4 is 78.") == (True, None)
    assert score("74 plus 4 is 79.", "74 plus 4 is 78.") == (False, None)
    assert score("31", "31") == (True, None)  # a JSON scalar is not structured output: plain text


def test_summary_line():
    s = TaskScore(n=48, exact_match=12 / 48, valid_json=40 / 48, samples=[], json_n=48)
    assert s.summary() == "task: exact match 12/48 (25.0%), valid JSON 40/48 (83.3%)"
    assert TaskScore(4, 0.5, None, []).summary() == "task: exact match 2/4 (50.0%)"


def test_task_examples_from_chat_and_instruction_records():
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    (ex,) = task_examples(chat, "chat")
    assert ex.prompt == chat[0]["messages"][:2] and ex.reference == "4" and ex.text_prompt is None
    inst = [{"instruction": "Reverse:", "input": "red blue", "output": "blue red"},
            {"instruction": "Hi", "output": "x"}]
    a, b = task_examples(inst, "instruction")
    assert a.prompt == [{"role": "user", "content": "Reverse:\n\nred blue"}] and a.reference == "blue red"
    assert a.text_prompt.endswith("### Input:\nred blue\n\n### Response:\n") and b.prompt[0]["content"] == "Hi"
    with pytest.raises(InputError, match="format 'text'"):
        task_examples([{"text": "hello"}], "text")
    with pytest.raises(InputError, match="row 0"):
        task_examples([{"messages": [{"role": "user", "content": "hi"}]}], "chat")


def test_people_json_references_are_json():
    ds, _ = load_records(str(ASSETS / "data" / "people-json-eval.jsonl"))
    exs = task_examples(ds, "chat")
    assert len(exs) == len(ds) and all(score(e.reference, e.reference) == (True, True) for e in exs)


@pytest.fixture(scope="module")
def tiny():
    tok = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    model = load_quantized_model(resolve_model_dir("builtin:tiny-llama"), "cpu", dtype=torch.float32,
                                 compute_dtype=torch.float32)
    return model, tok


def test_evaluate_task_scores_the_replies_generate_gives(tiny):
    model, tok = tiny
    ds, _ = load_records("builtin:tiny-chat")
    exs = task_examples(ds.select(range(5)), "chat")
    got = evaluate_task(model, tok, exs, max_new_tokens=6, batch_size=2)
    replies = generate(model, tok, [prompt_ids(tok, e.prompt) for e in exs], max_new_tokens=6)
    assert got.n == 5 and got.valid_json is None and got.json_n == 0
    assert [s[1] for s in got.samples] == replies
    assert [s[0] for s in got.samples] == [e.prompt[-1]["content"] for e in exs]
    assert [s[2] for s in got.samples] == [e.reference for e in exs]
    assert got.exact_match == sum(score(r, e.reference)[0] for r, e in zip(replies, exs)) / 5
    # references equal to the model's own replies: every one matches
    same = [dataclasses.replace(e, reference=r) for e, r in zip(exs, replies)]
    assert evaluate_task(model, tok, same, max_new_tokens=6).exact_match == 1.0
    with pytest.raises(InputError):
        evaluate_task(model, tok, [])


def test_instruction_examples_without_a_chat_template_use_the_text_prompt(tiny):
    model, _ = tiny
    plain = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    plain.chat_template = None
    exs = task_examples([{"instruction": "Say hi", "output": "hi"}], "instruction")
    got = evaluate_task(model, plain, exs, max_new_tokens=4)
    want = generate(model, plain, [prompt_ids(plain, exs[0].text_prompt, chat=False)], max_new_tokens=4)
    assert got.samples[0][1] == want[0]
    with pytest.raises(InputError, match="chat template"):
        evaluate_task(model, plain, [TaskExample([{"role": "user", "content": "x"}], "y")])
