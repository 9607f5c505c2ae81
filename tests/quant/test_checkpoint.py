"""Checkpoint loading/saving against the oracles: transformers + bitsandbytes.

Every comparison is exact (torch.equal): the same 16-bit checkpoint must give
the same packed bytes, scales and logits whether transformers or quant does
the quantizing, loading or saving.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, bnb_config, input_ids, logits, save_tiny, transformers_4bit
from transformers import AutoModelForCausalLM

from quant import InputError, NF4Linear, load_quantized_model, quantize_checkpoint, quantize_model, save_quantized
from quant.checkpoint import Checkpoint


def _file_tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_tensors(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), f"{k} differs"


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    """A saved 16-bit tiny model, transformers' own 4-bit version of it, and that saved."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    src = save_tiny(arch, root / "bf16")
    ref = transformers_4bit(src, bnb_config())
    ref.save_pretrained(str(root / "hf-4bit"))
    ids = input_ids()
    return dict(arch=arch, root=root, src=src, ref=ref, ref_dir=root / "hf-4bit", ids=ids, ref_logits=logits(ref, ids))


def test_load_16bit_matches_transformers_quantization(case):
    """16-bit dir -> load_quantized_model == transformers' bnb quantization: bytes, buffers, logits."""
    model = load_quantized_model(case["src"])
    ref_sd = case["ref"].state_dict()
    n4 = 0
    for name, mod in model.named_modules():
        if isinstance(mod, NF4Linear):
            n4 += 1
            assert torch.equal(mod.weight, ref_sd[name + ".weight"]), name
            assert torch.equal(mod.absmax, ref_sd[name + ".weight.absmax"]), name
            assert torch.equal(mod.nested_absmax, ref_sd[name + ".weight.nested_absmax"]), name
    assert n4 == 14  # 7 linears x 2 layers; lm_head stays 16-bit
    for name, buf in case["ref"].named_buffers():  # rotary inv_freq, Gemma's embed_scale: same values and dtypes
        ours = model.get_buffer(name)
        assert ours.dtype == buf.dtype and torch.equal(ours, buf), name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and not model.training
    if case["arch"] == "gemma":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, case["ids"]), case["ref_logits"])


def test_load_transformers_saved_4bit(case):
    """A checkpoint quantized and saved by transformers loads without re-quantizing and gives its logits."""
    model = load_quantized_model(case["ref_dir"], quant_type="fp4", blocksize=128)  # file's format wins
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, NF4Linear) and layer.quant_type == "nf4" and layer.blocksize == 64
    assert torch.equal(logits(model, case["ids"]), case["ref_logits"])


def test_save_quantized_matches_transformers_files(case, tmp_path):
    """save_quantized writes the same tensors and quantization_config that transformers writes."""
    model = load_quantized_model(case["src"])
    report = save_quantized(model, tmp_path / "ours")
    _assert_same_tensors(_file_tensors(tmp_path / "ours"), _file_tensors(case["ref_dir"]))
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    ref_cfg = json.loads((case["ref_dir"] / "config.json").read_text())
    assert ours_cfg["quantization_config"] == ref_cfg["quantization_config"]
    assert ours_cfg["dtype"] == "bfloat16"
    assert report.n_quantized == 14 and report.files == ("model.safetensors",)


def test_save_after_quantize_model_matches_transformers_files(case, tmp_path):
    """The in-memory path: a 16-bit model from transformers -> quantize_model -> save_quantized."""
    model = AutoModelForCausalLM.from_pretrained(str(case["src"]), dtype=torch.bfloat16)
    quantize_model(model)
    save_quantized(model, tmp_path / "ours")
    _assert_same_tensors(_file_tensors(tmp_path / "ours"), _file_tensors(case["ref_dir"]))


def test_streaming_quantize_matches_transformers_files(case, tmp_path):
    report = quantize_checkpoint(case["src"], tmp_path / "q")
    _assert_same_tensors(_file_tensors(tmp_path / "q"), _file_tensors(case["ref_dir"]))
    assert (tmp_path / "q" / "generation_config.json").is_file()
    assert report.bytes_total_after == sum(t.nbytes for t in _file_tensors(tmp_path / "q").values())
    assert report.bytes_total_before == sum(
        t.nbytes for t in load_file(str(case["src"] / "model.safetensors")).values()
    )


def test_fp4_without_double_quant_matches_transformers(tmp_path):
    src = save_tiny("llama", tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "q", quant_type="fp4", double_quant=False)
    ref = transformers_4bit(src, bnb_config("fp4", double_quant=False))
    ref.save_pretrained(str(tmp_path / "ref"))
    _assert_same_tensors(_file_tensors(tmp_path / "q"), _file_tensors(tmp_path / "ref"))
    model = load_quantized_model(tmp_path / "q")
    assert model.model.layers[1].self_attn.q_proj.absmax.dtype == torch.float32
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(ref, ids))


def test_sharded_in_and_out(tmp_path):
    """A sharded 16-bit source, a sharded 4-bit output with index; transformers loads it."""
    src = save_tiny("qwen2", tmp_path / "bf16", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    report = quantize_checkpoint(src, tmp_path / "q", max_shard_size="30KB")
    assert len(report.files) > 2
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.files)
    assert index["metadata"]["total_size"] == report.bytes_total_after
    # the tensors of one weight never straddle two shards
    owners = {}
    for key, f in index["weight_map"].items():
        owners.setdefault(key.split(".weight")[0], set()).add(f)
    assert all(len(files) == 1 for files in owners.values())
    ids = input_ids()
    hf = transformers_4bit(tmp_path / "q")
    ref = transformers_4bit(src, bnb_config())
    assert torch.equal(logits(hf, ids), logits(ref, ids))
    assert torch.equal(logits(load_quantized_model(tmp_path / "q"), ids), logits(ref, ids))


def test_dtype_choice_casts_before_quantizing(tmp_path):
    """An fp32 checkpoint: dtype='bfloat16' casts first, exactly like transformers with dtype=bf16."""
    src = save_tiny("llama", tmp_path / "fp32", dtype=torch.float32)
    model = load_quantized_model(src, dtype="bfloat16")
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16
    ref = transformers_4bit(src, bnb_config(), dtype=torch.bfloat16)
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    # no dtype given: config.json's float32 is used (logged), not silently changed
    assert load_quantized_model(src).model.norm.weight.dtype == torch.float32


def test_quant_storage_bf16_checkpoint(tmp_path):
    """bnb_4bit_quant_storage=bfloat16 (used with FSDP) stores the same codes in bf16 words."""
    src = save_tiny("llama", tmp_path / "bf16")
    ref = transformers_4bit(src, bnb_config(bnb_4bit_quant_storage=torch.bfloat16))
    ref.save_pretrained(str(tmp_path / "ref"))
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"
    ids = input_ids()
    assert torch.equal(logits(load_quantized_model(tmp_path / "ref"), ids), logits(ref, ids))


def test_progress_callback_reaches_total(tmp_path):
    src = save_tiny("llama", tmp_path / "bf16")
    seen = []
    load_quantized_model(src, progress=lambda done, total, key: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == Checkpoint(src).total_bytes()
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ---- bad input ---------------------------------------------------------------------------


def test_missing_and_non_model_dirs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_quantized_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        load_quantized_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_quantized_model(tmp_path / "empty")
    src = save_tiny("llama", tmp_path / "m")
    cfg = (src / "config.json").read_text()
    (src / "config.json").write_text(cfg.replace('"model_type": "llama"', '"model_type": "no-such-arch"'))
    with pytest.raises(InputError, match="transformers cannot read the config.*'no-such-arch'"):
        load_quantized_model(src)
    (src / "config.json").write_text(cfg)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(InputError, match="no \\*.safetensors.*pytorch_model.bin"):
        quantize_checkpoint(src, tmp_path / "out")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_quantized_model(src)
    (src / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        load_quantized_model(src)


@pytest.mark.parametrize("kw, bad", [
    (dict(blocksize=48), "48"), (dict(quant_type="int4"), "'int4'"), (dict(dtype="int8"), "'int8'"),
    (dict(compute_dtype="float64"), "'float64'"), (dict(device="tpu"), "'tpu'"),
])
def test_bad_arguments_name_the_value(tmp_path, kw, bad):
    src = save_tiny("llama", tmp_path / "m")
    for fn in (lambda: load_quantized_model(src, **kw), lambda: quantize_checkpoint(src, tmp_path / "o", **kw)):
        with pytest.raises(InputError) as e:
            fn()
        assert bad in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def _rewrite(path, fn):
    """Rewrite a single-file checkpoint's tensors through ``fn(dict) -> dict``."""
    f = path / "model.safetensors"
    save_file(fn(load_file(str(f))), str(f), metadata={"format": "pt"})


def test_non_floating_weight(tmp_path):
    src = save_tiny("llama", tmp_path / "m")
    key = "model.layers.1.mlp.gate_proj.weight"
    _rewrite(src, lambda t: {**t, key: t[key].to(torch.int32)})
    for fn in (lambda: load_quantized_model(src), lambda: quantize_checkpoint(src, tmp_path / "o")):
        with pytest.raises(InputError, match=f"{key}.*int32.*floating"):
            fn()


def test_missing_unexpected_and_misshapen_keys(tmp_path):
    src = save_tiny("llama", tmp_path / "m")
    _rewrite(src, lambda t: {
        ("model.layers.0.mlp.gate.weight" if k.endswith("0.mlp.gate_proj.weight") else k): v for k, v in t.items()
    })
    with pytest.raises(
        InputError, match=r"1 missing key.*0\.mlp\.gate_proj\.weight.*1 unexpected key.*0\.mlp\.gate\.weight"
    ):
        load_quantized_model(src)
    src = save_tiny("llama", tmp_path / "m2")
    _rewrite(src, lambda t: {**t, "model.norm.weight": torch.ones(3, dtype=torch.bfloat16)})
    with pytest.raises(InputError, match=r"model\.norm\.weight.*\[3\].*\[128\]"):
        load_quantized_model(src)


@pytest.fixture
def hf4(tmp_path):
    src = save_tiny("llama", tmp_path / "m")
    transformers_4bit(src, bnb_config()).save_pretrained(str(tmp_path / "q"))
    return tmp_path / "q"


QS = "model.layers.0.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4"


def test_missing_quant_state(hf4):
    _rewrite(hf4, lambda t: {k: v for k, v in t.items() if k != QS})
    with pytest.raises(InputError, match=f"'model.layers.0.self_attn.o_proj.weight' has no quant-state entry.*{QS}"):
        load_quantized_model(hf4)


@pytest.mark.parametrize("payload, why", [
    (b"\xff\xfe not json", "not UTF-8 JSON"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"}', "lacks the field"),
    (b'{"quant_type": "nf4", "blocksize": 48, "dtype": "bfloat16", "shape": [128, 128]}', "blocksize 48"),
    (b'{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 128]}', "says quant_type 'fp4'"),
])
def test_corrupt_quant_state(hf4, payload, why):
    _rewrite(hf4, lambda t: {**t, QS: torch.tensor(list(payload), dtype=torch.uint8)})
    with pytest.raises(InputError, match=f"{QS}.*{why}"):
        load_quantized_model(hf4)


def test_missing_and_wrong_absmax(hf4):
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    _rewrite(hf4, lambda t: {**t, key: t[key][:-1]})
    with pytest.raises(InputError, match=f"{key}.*511 values.*512"):
        load_quantized_model(hf4)
    _rewrite(hf4, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(InputError, match=f"missing its '{key}'"):
        load_quantized_model(hf4)


def test_quantizing_a_quantized_checkpoint_is_refused(hf4, tmp_path):
    with pytest.raises(InputError, match="already a bitsandbytes 4-bit checkpoint"):
        quantize_checkpoint(hf4, tmp_path / "again")


def test_output_dir_is_never_clobbered(tmp_path):
    src = save_tiny("llama", tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists and is not empty.*overwrite"):
        quantize_checkpoint(src, out)
    with pytest.raises(InputError, match="is the input checkpoint"):
        quantize_checkpoint(src, src, overwrite=True)
    # a failure half-way with overwrite=True leaves the old directory intact and no temp dirs behind
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite(src, lambda t: {**t, key: t[key].to(torch.int16)})
    with pytest.raises(InputError):
        quantize_checkpoint(src, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    src = save_tiny("llama", tmp_path / "m2")
    model = load_quantized_model(src)
    with pytest.raises(InputError, match="already exists"):
        save_quantized(model, out)
    save_quantized(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m2", "out"]
