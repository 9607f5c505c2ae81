"""``qlora eval``: its numbers are the trainer's eval loss and the task metric, computed directly."""

import json
import math

import pytest
from transformers import AutoTokenizer

from qlora.builtin_models import resolve_model_dir
from qlora.cli import main
from qlora.data import BUILTIN_DATA, load_records, pack_rows, tokenize_dataset
from qlora.tasks import evaluate_task, task_examples
from qlora.train.loss import CHUNK_TOKENS
from qlora.train.precision import autocast_dtype_for
from qlora.train.setup import row_targets
from qlora.train.step import evaluate
from quant.loading import load_quantized_model

N = 6


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "chat.jsonl"
    with open(BUILTIN_DATA["tiny-chat"]) as f:
        path.write_text("".join(next(f) for _ in range(N)))
    return str(path)


def _eval(capsys, *argv):
    capsys.readouterr()
    rc = main(["eval", "--base", "builtin:tiny-llama", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_numbers_equal_a_direct_computation(chat_file, capsys):
    rc, out, err = _eval(capsys, "--data", chat_file, "--json", "--max-new-tokens", 4, "--batch-size", 4)
    assert rc == 0, err
    got = json.loads(out)

    model_dir = resolve_model_dir("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_quantized_model(model_dir, "cpu")
    ds, src = load_records(chat_file)
    exs, _ = tokenize_dataset(ds, src, tok, "chat", 512)
    rows = pack_rows(exs, max(len(e.input_ids) for e in exs), tok.pad_token_id, packing=False)
    loss = evaluate(model, rows, 4, CHUNK_TOKENS, autocast_dtype_for(model.device, "bfloat16"), model.device)
    task = evaluate_task(model, tok, task_examples(ds, "chat"), max_new_tokens=4, batch_size=4)

    assert got["examples"] == N and got["format"] == "chat" and got["target_tokens"] == sum(row_targets(rows))
    assert got["eval_loss"] == loss and got["perplexity"] == math.exp(loss)
    assert got["task"]["n"] == N and got["task"]["exact_match"] == task.exact_match
    assert got["task"]["valid_json"] is None and got["task"]["summary"] == task.summary()
    assert got["task"]["sample"] == dict(zip(("prompt", "reply", "reference"), task.samples[0]))


def test_text_report_and_no_task(chat_file, capsys):
    rc, out, err = _eval(capsys, "--data", chat_file, "--max-new-tokens", 2, "--max-examples", 3)
    assert rc == 0, err
    assert "3 examples" in out and "eval loss " in out and "task: exact match " in out and "sample reply:" in out
    rc, out, err = _eval(capsys, "--data", chat_file, "--no-task", "--json")
    assert rc == 0, err
    assert json.loads(out)["task"] is None
    rc, out, err = _eval(capsys, "--data", "builtin:tiny-text", "--max-examples", 3, "--json")  # text: loss only
    assert rc == 0, err
    assert json.loads(out)["format"] == "text" and json.loads(out)["task"] is None


def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, capsys):
    rc, out, err = _eval(capsys, "--data", tmp_path / "missing.jsonl")
    flat = " ".join(err.split())  # the message is wrapped at 100 columns
    assert rc == 2 and err.startswith("error: ") and "does not exist" in flat and "Traceback" not in err
    assert err.count("error:") == 1 and "\n\n" not in err.strip()
    rc, out, err = _eval(capsys, "--data", "builtin:tiny-text", "--task")
    flat = " ".join(err.split())
    assert rc == 2 and "--task" in flat and "'text'" in flat and "Traceback" not in err
    rc, out, err = _eval(capsys, "--data", "builtin:tiny-text", "--batch-size", 0)
    assert rc == 2 and "--batch-size" in err
