"""``qlora generate --prompts``: replies as the Python API gives them, JSONL out, and bad input named by line."""

import json

import pytest
import torch
from lora_helpers import randomize_adapters, tiny_model
from transformers import AutoTokenizer

from qlora.adapters.files import read_adapter, save_adapter
from qlora.adapters.multi import add_adapter
from qlora.adapters.record import serving_format
from qlora.builtin_models import resolve_model_dir
from qlora.cli import main
from qlora.generation import generate, prompt_ids
from qlora.lora.surgery import apply_lora
from quant import quantize_model
from quant.loading import load_quantized_model

BASE = "builtin:tiny-llama"
LINES = [{"prompt": "What is two plus two?", "adapter": "a", "id": "q1"},
         {"prompt": [{"role": "user", "content": "Name a city."}], "adapter": "b"},
         {"prompt": "Hi", "adapter": None},
         {"prompt": "What is two plus two?", "adapter": "b"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapters a (LoRA r4, attention) and b (DoRA r2, MLP) on the NF4 builtin base; c on its 16-bit weights;
    wrong for another model."""
    root = tmp_path_factory.mktemp("cli-generate")
    model_dir = resolve_model_dir(BASE)
    for name, kw, quant in (("a", dict(targets="attention", rank=4), "nf4"),
                            ("b", dict(targets="mlp", rank=2, use_dora=True), "nf4"),
                            ("c", dict(targets="attention", rank=2), "none")):
        m = load_quantized_model(model_dir, "cpu", quant_type=quant)
        apply_lora(m, alpha=8.0, **kw)
        randomize_adapters(m, seed=ord(name), std_b=0.5)
        save_adapter(m, root / name)
    other = quantize_model(tiny_model("llama", dtype=torch.bfloat16))  # NF4 as well, but hidden 64, not 128
    apply_lora(other, targets="attention", rank=2)
    save_adapter(other, root / "wrong")
    return root


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _generate(capsys, *argv):
    capsys.readouterr()
    rc = main(["generate", "--base", BASE, "--max-new-tokens", "6", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, " ".join(out.err.split())  # errors are wrapped at 100 columns


def test_prompts_file_replies_equal_the_python_api(adapters, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", LINES[:2] + [""] + LINES[2:])  # a blank line is skipped
    rc, out, err = _generate(capsys, "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}",
                             "--prompts", prompts, "--batch-size", 3)
    assert rc == 0, err
    got = sorted((json.loads(x) for x in out.splitlines()), key=lambda r: r["index"])
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert [(r["prompt"], r["adapter"]) for r in got] == [(x["prompt"], x["adapter"]) for x in LINES]
    assert got[0]["id"] == "q1"  # other keys of a line come back with its reply

    model_dir = resolve_model_dir(BASE)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_quantized_model(model_dir, "cpu", **serving_format(read_adapter(adapters / "a").base))
    add_adapter(model, "a", adapters / "a")
    add_adapter(model, "b", adapters / "b")
    want = generate(model, tok, [prompt_ids(tok, x["prompt"]) for x in LINES], max_new_tokens=6,
                    adapters=[x["adapter"] for x in LINES])
    assert [r["reply"] for r in got] == want
    assert got[0]["reply"] != got[3]["reply"]  # one prompt, two adapters


def test_output_file_is_written_in_order_and_kept_without_overwrite(adapters, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Name a city."}])
    out_file = tmp_path / "replies.jsonl"
    rc, out, err = _generate(capsys, "--adapter", adapters / "a", "--prompts", prompts, "--output", out_file)
    assert rc == 0, err
    rows = [json.loads(x) for x in out_file.read_text().splitlines()]
    # no "adapter" key with a single --adapter DIR: that adapter, named "default"
    assert [(r["index"], r["adapter"]) for r in rows] == [(0, "default"), (1, "default")] and out == ""
    before = out_file.read_bytes()
    rc, _, err = _generate(capsys, "--prompts", prompts, "--output", out_file)
    assert rc == 2 and "exists; pass --overwrite" in err and out_file.read_bytes() == before
    rc, _, err = _generate(capsys, "--prompts", prompts, "--output", out_file, "--overwrite")
    assert rc == 0, err
    assert [json.loads(x)["adapter"] for x in out_file.read_text().splitlines()] == [None, None]  # the base
    rc, _, err = _generate(capsys, "--prompts", prompts, "--output", prompts, "--overwrite")
    assert rc == 2 and "is the --prompts file itself" in err


@pytest.mark.parametrize("lines, adapter_args, message", [
    (['{"prompt": "Hi", "adapter": "a"}', '{"prompt": "Hi", '], ["a"], "line 2 is not valid JSON"),
    ([{"prompt": "  ", "adapter": "a"}], ["a"], "line 1 has an empty prompt"),
    ([{"prompt": []}], ["a"], 'line 1: "prompt" must be a non-empty string'),
    (['["Hi"]'], ["a"], "line 1 is '[\"Hi\"]'; each line is an object"),
    ([{"prompt": "Hi", "adapter": "a"}, {"prompt": "Hi", "adapter": "sql"}], ["a", "b"],
     "line 2 names the adapter 'sql', which no --adapter gives; valid: 'a' or 'b', or null for the base"),
    ([{"prompt": "Hi", "adapter": "a"}, {"prompt": "Hi"}], ["a", "b"], 'line 2 names no "adapter"'),
    ([{"prompt": "Hi", "adapter": "a"}], ["a", "c"], "Cannot serve adapters trained on different bases: --adapter a="),
    ([{"prompt": "Hi", "adapter": "a"}], ["a", "wrong"], "wrong does not fit --base builtin:tiny-"),
    ([{"prompt": "Hi"}], ["a", "a"], "the name 'a' is given twice"),
])
def test_bad_input_names_the_line_and_the_value(adapters, tmp_path, capsys, lines, adapter_args, message):
    prompts = _write(tmp_path / "p.jsonl", lines)
    args = [x for n in adapter_args for x in ("--adapter", f"{n}={adapters / n}")]
    rc, out, err = _generate(capsys, *args, "--prompts", prompts)
    assert rc == 2 and out == ""
    assert message in err, err


def test_bad_arguments(adapters, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    rc, _, err = _generate(capsys, "--adapter", adapters / "a", "--adapter", f"b={adapters / 'b'}",
                           "--prompts", prompts)
    assert rc == 2 and "with several adapters each needs a name" in err
    rc, _, err = _generate(capsys, "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}",
                           "--prompt", "Hi")
    assert rc == 2 and "--prompts FILE.jsonl" in err
    rc, _, err = _generate(capsys, "--prompt", " ")
    assert rc == 2 and "is empty" in err
    rc, _, err = _generate(capsys, "--prompts", tmp_path / "missing.jsonl")
    assert rc == 2 and "cannot read it" in err
    rc, _, err = _generate(capsys, "--prompts", _write(tmp_path / "empty.jsonl", ["", " "]))
    assert rc == 2 and "holds no prompt" in err
    rc, _, err = _generate(capsys, "--prompt", "Hi", "--overwrite")
    assert rc == 2 and "give --output" in err
