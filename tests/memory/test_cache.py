"""memory.cache and the pure-Python profiles: shipped entries are current, the disk cache is safe, pruning is exact."""

import json
import logging
import multiprocessing
import subprocess
import sys

import pytest

import memory
from memory import cache, fit, meta, profile, spec
from memory.footprint import _resolved
from memory.profile import Fitted, StepProfile
from memory.settings import PLAN_DEFAULTS


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty user cache and empty in-process caches (restored afterwards)."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    caches = (spec._spec_cached, profile.body_profile, profile.hf_head_profile, cache._shipped, cache._shipped_index)
    for c in caches:
        c.cache_clear()
    cache._warned.clear()
    yield tmp_path / "cache" / "planner"
    for c in caches:
        c.cache_clear()


def _default_profile(name):
    model = memory.load_spec(name)
    attn, shorts = _resolved(model, PLAN_DEFAULTS.attn, PLAN_DEFAULTS.targets)
    return model, profile.body_profile(model, shorts, attn=attn)


def _no_build(*_args, **_kwargs):
    raise AssertionError("built instead of read from the shipped profiles")


def test_every_catalog_model_is_shipped_for_the_default_plan(fresh, monkeypatch):
    # A stale shipped file (after a change to the probe, the layers or the versions) fails here:
    # rerun scripts/make_profiles.py.
    monkeypatch.setattr(meta, "build_spec", _no_build)
    monkeypatch.setattr(fit, "fit_body", _no_build)
    stale = []
    for name in memory.known_models():
        try:
            assert memory.estimate(name, seq_len=2048).tensor_peak_bytes > 0
        except AssertionError:
            stale.append(name)
    assert not stale, f"shipped profiles missing or stale for {stale}: run scripts/make_profiles.py"
    assert not fresh.exists()  # nothing was built, so nothing was written


def test_every_recipe_plans_from_the_shipped_profiles(fresh, monkeypatch):
    # what `qlora train RECIPE` pays to plan at its start: a read, never a dry run
    from pathlib import Path

    from qlora.train.plan import plan_recipe
    from qlora.train.recipe import load_recipe

    monkeypatch.setattr(meta, "build_spec", _no_build)
    monkeypatch.setattr(fit, "fit_body", _no_build)
    monkeypatch.setattr(fit, "fit_head", _no_build)
    recipes = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        plan_recipe(load_recipe(path))
    assert not fresh.exists()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-2-2b"])
def test_shipped_entries_equal_a_fresh_build(fresh, name):
    shipped = json.loads((cache.SHIPPED_DIR / f"{name}.json").read_text())["entries"]
    model, prof = _default_profile(name)
    attn, shorts = _resolved(model, PLAN_DEFAULTS.attn, PLAN_DEFAULTS.targets)
    assert meta.build_spec(model.config, name).to_dict() == {**model.to_dict(), "name": name}
    # the default plan's profile, and the tiled ones (long-context plans)
    for mlp, norms in ((False, False), (True, False), (True, True)):
        built = fit.fit_body(model, shorts, 0.0, False, "bfloat16", attn, True, "cuda", "nf4", 64, True, None, mlp,
                             norms)
        body = [e["value"] for e in shipped.values() if e["parts"]["kind"] == "profile" and e["parts"]["window"] is None
                and (e["parts"]["tiled_mlp"], e["parts"]["tiled_norms"]) == (mlp, norms)]
        assert body == [built]


def test_pruning_changes_no_answer(fresh):
    model = memory.load_spec("qwen2.5-0.5b")
    attn, shorts = _resolved(model, "eager", "all-linear")
    run = lambda b, s, r, t: fit.body_run(model, b, s, r, shorts, attn=attn)  # noqa: E731
    groups = fit.fit(run, (fit.BODY_MIN, fit.ALL), uses_rank=True)
    pruned = [fit.prune(g) for g in groups]
    assert sum(len(g["coef"]) for g in pruned) < sum(len(g["coef"]) for g in groups) / 2
    types = fit.probe_layer_types(model)
    full, small = StepProfile(Fitted(groups), types), StepProfile(Fitted(pruned), types)
    head = profile.Segment([0] * len(profile.TAGS), [0] * len(profile.TAGS))
    for b, s, r in [(1, 7, 1), (1, 4096, 64), (3, 100, 8), (8, 2048, 16), (2, 33000, 256)]:
        assert full.phases(b, s, r, model.layer_types, head) == small.phases(b, s, r, model.layer_types, head)


def _custom():
    cfg = memory.load_spec("smollm2-135m").config
    cfg["num_hidden_layers"] = 3
    return memory.spec_from_config(cfg, name="custom-3-layer")


def test_a_new_model_is_built_once_then_read_back(fresh, monkeypatch):
    first = memory.estimate(_custom(), seq_len=512)
    files = sorted(p.name.partition("-")[0] for p in fresh.glob("*.json"))
    assert files == ["profile", "spec"]
    spec._spec_cached.cache_clear()
    profile.body_profile.cache_clear()
    monkeypatch.setattr(meta, "build_spec", _no_build)
    monkeypatch.setattr(fit, "fit_body", _no_build)
    assert memory.estimate(_custom(), seq_len=512) == first


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key parts", "no value"])
def test_a_corrupt_entry_is_ignored_and_rebuilt(fresh, damage):
    first = memory.estimate(_custom(), seq_len=512)
    for path in fresh.glob("*.json"):
        text = path.read_text()
        stored = json.loads(text)
        path.write_text({
            "garbage": "\x00not json",
            "truncated": text[: len(text) // 2],
            "other key parts": json.dumps(dict(stored, parts=dict(stored["parts"], torch="0.0"))),
            "no value": json.dumps({"parts": stored["parts"]}),
        }[damage])
    spec._spec_cached.cache_clear()
    profile.body_profile.cache_clear()
    assert memory.estimate(_custom(), seq_len=512) == first
    for path in fresh.glob("*.json"):
        assert "value" in json.loads(path.read_text())  # rewritten whole


def test_an_unwritable_cache_warns_once_and_still_plans(tmp_path, monkeypatch, caplog, fresh):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "cache"))  # a folder cannot be made inside a file
    with caplog.at_level(logging.WARNING, logger="memory.cache"):
        fp = memory.estimate(_custom(), seq_len=512)
        memory.estimate(_custom(), seq_len=512, targets="qv")
    assert fp.tensor_peak_bytes > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "QLORA_CACHE" in warnings[0].getMessage() and str(blocker) in warnings[0].getMessage()


def _write_same_entry(args):
    root, n = args
    import os

    os.environ[cache.CACHE_ENV] = root
    for _ in range(n):
        cache._write(cache.cache_root() / "planner" / "spec-shared.json", {"i": 0}, {"payload": "x" * 50_000})
    return True


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    root = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_write_same_entry, [(root, 20)] * 4))
    folder = tmp_path / "cache" / "planner"
    assert [p.name for p in folder.iterdir()] == ["spec-shared.json"]  # no temporaries left behind
    assert cache._read(folder / "spec-shared.json", {"i": 0}) == {"payload": "x" * 50_000}


def test_a_cached_catalog_plan_imports_neither_torch_nor_transformers():
    code = (
        "import sys, memory\n"
        "p = memory.plan('24GB', 'llama-3.1-8b', micro_batch_size='auto')\n"
        "assert p.fits\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_qlora_plan_with_an_unwritable_cache_warns_once_and_answers(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = tmp_path / "model"
    model.mkdir()
    cfg = memory.load_spec("smollm2-135m").config
    cfg["num_hidden_layers"] = 2
    (model / "config.json").write_text(json.dumps(cfg))
    env = dict(__import__("os").environ, QLORA_CACHE=str(blocker / "cache"))
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "plan", "--gpu", "24GB", "--model", str(model)],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "fits" in out.stdout
    assert out.stderr.count("cannot write the planner cache") == 1, out.stderr


def test_probe_sequences_stay_within_max_probe_seq():
    assert max(s for _, s, _ in fit._CANDIDATES) == profile.MAX_PROBE_SEQ
    assert min(s for _, s, _ in fit._CANDIDATES) > profile.PROBE_WINDOW
