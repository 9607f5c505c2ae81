"""``qlora quantize``: its output is what transformers + bitsandbytes would produce, byte for byte."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import ARCHS, bnb_config, input_ids, logits, save_tiny, transformers_4bit

from qlora.cli import main


def _quantize(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the test model printed
    rc = main(["quantize", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_output_loads_in_transformers_bit_identical(arch, tmp_path, capsys):
    src = save_tiny(arch, tmp_path / "bf16")
    (src / "tokenizer_config.json").write_text("{}")  # side files travel with the weights
    rc, out, err = _quantize(capsys, src, "--out", tmp_path / "q")
    assert rc == 0, err
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()
    ours = transformers_4bit(tmp_path / "q")  # pre-quantized: transformers reads quantization_config itself
    ref = transformers_4bit(src, bnb_config())  # transformers quantizing the same 16-bit checkpoint
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    n_packed = 0
    for k, v in ref_sd.items():  # packed codes, absmax, nested absmax, code tables, quant-state JSON, 16-bit tensors
        assert ours_sd[k].dtype == v.dtype and torch.equal(ours_sd[k], v), k
        n_packed += v.dtype == torch.uint8 and k.endswith(".weight")
    assert n_packed == 14
    ids = input_ids()
    assert torch.equal(logits(ours, ids), logits(ref, ids))


def test_report_shows_4_127_bits_per_param(tmp_path, capsys):
    # Multi-head attention with hidden 128: every matrix holds a multiple of
    # 64*256 values, so codes + scales are exactly 4 + 8/64 + 32/16384 bits.
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    rc, out, err = _quantize(capsys, tmp_path / "m", "--out", tmp_path / "q")
    assert rc == 0, err
    row = re.search(r"4-bit linears\s+([\d,]+)\s+([\d.]+ \w+)\s+([\d.]+ \w+)\s+([\d.]+)", out)
    assert row and row.group(1) == f"{2 * (4 * 128 * 128 + 3 * 128 * 256):,}" and row.group(4) == "4.127", out
    whole = re.search(r"whole model\s+([\d,]+)\s+([\d.]+ \w+)\s+([\d.]+ \w+)\s+([\d.]+)", out)
    assert whole and 4.127 < float(whole.group(4)) < 16, out
    assert "Format rate: 4.127" in out

    rc, out, _ = _quantize(capsys, tmp_path / "m", "--out", tmp_path / "q2", "--no-double-quant", "--blocksize", "128")
    assert rc == 0 and re.search(r"4-bit linears.*\s4\.250\n", out), out  # 4 + 32/128


def test_skip_keeps_layers_16bit_and_transformers_agrees(tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "bf16")
    rc, _, err = _quantize(capsys, src, "--out", tmp_path / "q", "--skip", "down_proj")
    assert rc == 0, err
    ours = transformers_4bit(tmp_path / "q")
    assert type(ours.model.layers[1].mlp.down_proj).__name__ == "Linear"
    assert type(ours.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    ref = transformers_4bit(src, bnb_config(llm_int8_skip_modules=["lm_head", "down_proj"]))
    ids = input_ids()
    assert torch.equal(logits(ours, ids), logits(ref, ids))


def _assert_clean_error(rc, err, *needles):
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err
    flat = " ".join(err.split())  # the CLI wraps the paragraph at 100 columns
    for n in needles:
        assert n in flat, err


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    _assert_clean_error(
        *_quantize(capsys, tmp_path / "missing", "--out", tmp_path / "o")[::2], "missing", "does not exist"
    )
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "readme.txt").write_text("hi")
    _assert_clean_error(
        *_quantize(capsys, tmp_path / "notmodel", "--out", tmp_path / "o")[::2], "no config.json", "readme.txt"
    )
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    _assert_clean_error(*_quantize(capsys, tmp_path / "noweights", "--out", tmp_path / "o")[::2], "no *.safetensors")
    src = save_tiny("llama", tmp_path / "m")
    _assert_clean_error(
        *_quantize(capsys, src, "--out", tmp_path / "o", "--blocksize", "100")[::2], "blocksize 100", "64"
    )
    _assert_clean_error(*_quantize(capsys, src, "--out", tmp_path / "o", "--blocksize", "big")[::2], "'big'")
    _assert_clean_error(
        *_quantize(capsys, src, "--out", tmp_path / "o", "--quant-type", "int4")[::2], "'int4'", "'nf4'"
    )
    assert not (tmp_path / "o").exists()


def test_cli_does_not_clobber_existing_output(tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "m")
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"precious")
    _assert_clean_error(*_quantize(capsys, src, "--out", out)[::2], str(out), "--overwrite")
    assert (out / "adapter.safetensors").read_bytes() == b"precious"
    rc, _, err = _quantize(capsys, src, "--out", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "adapter.safetensors").exists() and (out / "model.safetensors").is_file()
