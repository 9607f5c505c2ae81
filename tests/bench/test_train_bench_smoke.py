"""CI smoke run of bench/train.py at the tiny size: it trains both stacks and writes well-formed results (not its speed)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("limit", [0, 3000, 4096, 5000, 70_000, 10**9])
def test_max_context_search_brackets_the_limit(limit):
    probes = []

    def fits(seq):
        probes.append(seq)
        return seq <= limit

    lo, hi = _bench().search_longest(fits, 4096, 1 << 20, 1024)
    if limit >= 1 << 20:
        assert hi is None and lo == 1 << 20
    else:  # the largest multiple of the resolution that fits, and the next one up failed
        assert lo == limit // 1024 * 1024 and hi == lo + 1024 and hi in probes
    assert len(probes) == len(set(probes)) <= 20  # each length probed once; a handful of fresh processes


def test_train_bench_runs_both_stacks_and_writes_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "train.py"), "--tiny", "--stacks", "hf,qlora", "--threads", "1",
           "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "qlora / hf" in p.stdout

    res = json.loads((tmp_path / "train-cpu-tiny.json").read_text())
    assert res["mode"] == "cpu-tiny" and res["device"] == "cpu" and res["date"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(res["versions"])
    assert [r["stack"] for r in res["runs"]] == ["hf", "qlora"]
    steps = res["settings"]["steps"]
    for r in res["runs"]:
        assert r["ok"] and not r["oom"]
        assert len(r["step_s"]) == len(r["losses"]) == steps and all(t > 0 for t in r["step_s"])
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        assert r["tokens_per_s"] > 0 and r["peak_rss"] >= r["rss_setup"] > 0
    hf, ql = res["runs"]
    assert hf["trainable_params"] == ql["trainable_params"] > 0  # the same adapters: rank 16 on every linear
    assert "float32" in hf["model_bytes_by_dtype"] and "bfloat16" not in hf["model_bytes_by_dtype"]  # PEFT's upcast
    assert ql["model_bytes_by_dtype"]["bfloat16"] > ql["model_bytes_by_dtype"].get("float32", 0)  # qlora keeps 16-bit
    # Same data and init scale: the two stacks' losses start at the same value (a random-init LM: about ln(vocab)).
    assert abs(hf["losses"][0] - ql["losses"][0]) < 1e-2
    assert abs(hf["losses"][0] - math.log(res["model"]["vocab_size"])) < 0.5
    (q,) = [q for q in res["ratios"] if (q["stack"], q["vs"]) == ("qlora", "hf")]
    assert q["tokens_per_s"] == ql["tokens_per_s"] / hf["tokens_per_s"]
    assert q["peak_rss"] == ql["peak_rss"] / hf["peak_rss"]

    md = (tmp_path / "train-cpu-tiny.md").read_text()
    assert md.startswith("# Training benchmark (cpu-tiny)")
    assert "| qlora / hf |" in md and "peft" in md and res["date"] in md
