"""CI smoke run of bench/train.py at the tiny size: it trains both stacks and writes well-formed results
(not its speed)."""

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


@pytest.mark.parametrize("slope,offset,curve", [(100, 10_000, 0.0), (37, 123_457, 0.0), (100, 10_000, 0.002)])
def test_slope_placed_probes_find_the_same_answer_in_fewer_probes(slope, offset, curve):
    """Memory ~ offset + slope*seq (+ a curve the line cannot model): the prediction never changes the answer,
    saves probes on a line, and costs at most its two probes otherwise."""
    from _search import linear_prediction, search_longest

    cap = 8_000_000
    peak = lambda seq: offset + slope * seq + curve * seq * seq  # noqa: E731
    results = {}
    for use_prediction in (False, True):
        probes, points = [], []

        def fits(seq, probes=probes, points=points):
            probes.append(seq)
            ok = peak(seq) <= cap
            if ok:
                points.append((seq, peak(seq)))
            return ok

        predict = (lambda points=points: linear_prediction(points, cap)) if use_prediction else None
        results[use_prediction] = (search_longest(fits, 4096, 1 << 20, 1024, predict), len(probes), max(probes))
    (plain, n_plain, _), (guided, n_guided, longest_probe) = results[False], results[True]
    assert guided == plain and peak(plain[0]) <= cap < peak(plain[1])
    assert n_guided <= n_plain + 2  # at most the two predicted probes are wasted when the line is wrong
    if curve == 0:
        assert n_guided <= n_plain - 3  # a straight line is found in two probes after the doubling
        assert longest_probe == guided[1]  # and the probe at twice the length (the slowest to fail) is never run


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


def test_max_context_mode_searches_in_process_and_confirms(tmp_path):
    """--mode max-context at the tiny size on the CPU (a simulated cap): search, out-of-memory recovery,
    fresh confirmation."""
    cmd = [sys.executable, str(ROOT / "bench" / "train.py"), "--mode", "max-context", "--tiny", "--stacks", "hf,qlora",
           "--cap-gib", "0.005", "--start-seq", "256", "--resolution", "128", "--max-seq", "8192", "--steps", "2",
           "--threads", "1", "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "train-max-context-tiny.json").read_text())
    hf, ql = res["max_context"]
    for r in (hf, ql):
        assert not r.get("error") and r["max_seq_len"] > 0 and not r["hit_search_cap"]
        fit = [p["seq_len"] for p in r["probes"] if p["ok"]]
        oom = [p["seq_len"] for p in r["probes"] if p["oom"]]
        assert oom and len(fit) + len(oom) == len(r["probes"])  # it ran into the cap and recovered in place
        assert max(fit) < min(oom) == r["first_failure"]  # monotone: every probe below the boundary fit
        assert r["first_failure"] - max(fit) == 128  # bracketed to the resolution
        assert r["confirmed"][-1] == {**r["confirmed"][-1], "seq_len": r["max_seq_len"], "ok": True}
        assert len(r["probes"]) <= 8  # the doubling plus a couple of slope-placed probes, not a long bisection
    # qlora's fused chunked loss keeps no logits for backward: it trains longer sequences under the same cap
    assert ql["max_seq_len"] > hf["max_seq_len"] and ql["vs_baseline"] == ql["max_seq_len"] / hf["max_seq_len"]
    md = (tmp_path / "train-max-context-tiny.md").read_text()
    assert "simulated on the CPU" in md and "| qlora |" in md


def test_a_stack_that_fails_midway_keeps_the_batches_it_finished(tmp_path):
    """One process trains several batch sizes (as on CUDA); a crash at the second keeps the first's measurements."""
    bench = _bench()
    arch = bench.MODELS["tiny"]
    bench.make_checkpoint(tmp_path / "ckpt", arch)
    spec = dict(model_dir=str(tmp_path / "ckpt"), device="cpu", seq_len=32, steps=3, rank=4, alpha=8.0, dropout=0.0,
                lr=1e-3, optimizer="adamw", qlora_adapter_dtype="bfloat16", chunk_tokens=16, seed=0,
                vocab_size=arch["vocab_size"], threads=1, stack="qlora", batches=[2, -1])  # batch -1 cannot be built
    with pytest.raises(bench.ChildFailed) as e:
        bench.run_child(spec)
    assert "exit code" in str(e.value)
    (kept,) = e.value.partial
    assert kept["batch"] == 2 and kept["ok"] and len(kept["losses"]) == 3 and kept["tokens_per_s"] > 0
