"""The trainer end to end on the builtin tiny model: smoke, accumulation, guards, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant import InputError
from qlora.cli import main as cli_main
from qlora.train.recipe import load_recipe
from qlora.train.loop import accumulate_gradients, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
FAST = ["seq_len=64", "micro_batch_size=2", "effective_batch_size=4", "max_steps=4", "eval_steps=2",
        "save_steps=2", "diagnostics_steps=2", "lora.rank=4", "data.eval_fraction=0.02"]


def _recipe(tmp_path, *extra):
    return load_recipe(TINY, FAST + [f"output_dir={tmp_path / 'out'}", *extra])


def _losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r], recs


def test_tiny_recipe_trains_and_writes_everything(tmp_path):
    res = train(_recipe(tmp_path), say=lambda m: None, progress=False)
    out = tmp_path / "out"
    assert res.stopped == "done" and res.steps == 4 and res.exit_code == 0
    losses, recs = _losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert recs[0]["step"] == 0 and "eval_loss" in recs[0]  # eval before training
    assert any("eval_loss" in r and r["step"] == 4 for r in recs)
    assert any(k.startswith("lora/") or "ratio" in k for r in recs for k in r)  # diagnostics logged
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "loss.png").exists() and (out / "memory.png").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    from qlora.builtin_models import resolve_model_dir

    assert cfg["base_model_name_or_path"] == str(resolve_model_dir("builtin:tiny-llama").resolve()) and cfg["r"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000004"]
    # re-running a finished run redoes nothing and keeps its log
    said = []
    again = train(_recipe(tmp_path), say=said.append, progress=False)
    assert again.stopped == "done" and again.resumed_from == 4 and "already holds a finished run" in " ".join(said)
    assert _losses(out)[0] == losses


def test_generate_samples_with_the_trained_adapter(tmp_path, capsys):
    train(_recipe(tmp_path, "max_steps=1"), say=lambda m: None, progress=False)
    rc = cli_main(["generate", "--base", "builtin:tiny-llama", "--adapter", str(tmp_path / "out"),
                   "--prompt", "What is 2 plus 2?", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("> What is 2 plus 2?\n")
    assert cli_main(["generate", "--base", "builtin:tiny-llama", "--prompt", "x", "--max-new-tokens", "0"]) == 2


def test_final_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qlora.adapters.files import load_adapter
    from qlora.builtin_models import resolve_model_dir

    train(_recipe(tmp_path, "max_steps=2"), say=lambda m: None, progress=False)
    base_dir = resolve_model_dir("builtin:tiny-llama")
    ids = torch.tensor([[1, 5, 9, 33, 80, 7]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "out"))
    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(ours, tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    b = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # the adapter actually trained


def test_gradient_accumulation_does_not_depend_on_split(tmp_path):
    from qlora.train.plan import plan_run
    from qlora.train.setup import build_model, resolve_device

    # fp32 end to end, so that only the normalization (not bf16 rounding) could make splits differ
    recipe = _recipe(tmp_path, "lora.dropout=0.0", "micro_batch_size=1", "model.dtype=float32",
                     "lora.dtype=float32", "quant.compute_dtype=float32")
    plan = plan_run(recipe, resolve_device("cpu"))
    model, _ = build_model(recipe, plan, torch.device("cpu"))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (4, 32), generator=g)
    labels = ids.clone()
    labels[0, :20] = -100  # uneven target counts: a per-micro-batch mean would weight rows differently
    labels[2, :5] = -100
    pos = torch.arange(32).expand(4, 32)

    def grads(split):
        for p in model.parameters():
            p.grad = None
        mbs = [{"input_ids": ids[i:j], "labels": labels[i:j], "position_ids": pos[i:j]} for i, j in split]
        loss = accumulate_gradients(model, mbs, None, torch.float32)
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole, g_whole = grads([(0, 4)])
    for split in ([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 3), (3, 4)]):
        loss, g_split = grads(split)
        assert abs(loss - whole) < 1e-5
        for a, b in zip(g_split, g_whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_nan_loss_stops_with_checkpoint(tmp_path):
    res = train(_recipe(tmp_path, "optimizer.lr=1.0e+30", "optimizer.name=adamw", "max_grad_norm=null",
                        "schedule.warmup_steps=0", "lora.dropout=0.0"), say=lambda m: None, progress=False)
    assert res.stopped == "nan" and res.exit_code == 4
    assert list((tmp_path / "out").glob("checkpoint-*/COMPLETE"))


def test_oom_saves_checkpoint_and_reports_prediction(tmp_path, monkeypatch):
    import qlora.train.loop as tr

    calls = {"n": 0}
    real = tr.forward_loss

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # eval + first step pass, then the device "runs out"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(tr, "forward_loss", flaky)
    said = []
    res = train(_recipe(tmp_path, "data.eval_fraction=0.0"), say=said.append, progress=False)
    assert res.stopped == "oom" and res.exit_code == 3
    msg = " ".join(said)
    assert "out of memory" in msg and "predicted" in msg and "does not shrink the batch" in msg
    assert list((tmp_path / "out").glob("checkpoint-*/COMPLETE"))


def test_bad_recipe_is_one_paragraph_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rnak: 8\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "lora.rnak" in err and "Traceback" not in err
    with pytest.raises(InputError, match="builtin"):
        train(_recipe(tmp_path, "model.path=builtin:nope"), say=lambda m: None, progress=False)


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert TINY in recipes
    for r in recipes:
        load_recipe(r)


def test_gpu_recipe_headers_quote_the_planner():
    """Each GPU recipe's header numbers are what the planner predicts today for its settings (no stale claims)."""
    import re

    from qlora.train.plan import plan_recipe

    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if path == TINY:
            continue
        header = " ".join(ln.lstrip("# ") for ln in path.read_text().splitlines() if ln.startswith("#"))
        model = re.search(r"catalog model (\S+?)[,)]", header)
        assert model, f"{path.name}: the header names no catalog model for its planner numbers"
        p = plan_recipe(load_recipe(path), model.group(1), torch.device("cuda"))
        gib = 2**30
        quoted = {
            "tensor peak": (r"predicted ([\d.]+) GiB of tensors", p.footprint.tensor_peak_bytes / gib),
            "with context and reserve": (r"\(([\d.]+) GiB with CUDA context", p.peak_bytes / gib),
            "usable": (r"of ([\d.]+) GiB usable", p.usable_bytes / gib),
            "micro-batch": (r"micro-batch (\d+) x", p.micro_batch_size),
            "seq_len": (r"at seq ([\d,]+)|is ([\d,]+) tokens", p.seq_len),
        }
        for what, (rx, value) in quoted.items():
            m = re.search(rx, header)
            if m is None:
                continue
            got = float(next(g for g in m.groups() if g).replace(",", ""))
            assert abs(got - value) < 0.006, f"{path.name}: header says {what} {got}, the planner now says {value:.3f}"
            checked += 1
        assert p.fits and "Measured:" in header
    assert checked >= 5 * 4


def _cli(out, *extra, env=None):
    cmd = [sys.executable, "-m", "qlora.cli", "train", "--no-progress", str(TINY), *FAST, "max_steps=6",
           "lora.dropout=0.1", f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    """SIGKILL mid-run, re-run the same command: same final adapter and loss log, bit for bit."""
    ref = tmp_path / "ref"
    p = _cli(ref)
    assert p.wait(timeout=300) == 0, p.stdout.read()
    run = tmp_path / "run"
    p = _cli(run)
    deadline = time.time() + 300
    while not list(run.glob("checkpoint-0000004/COMPLETE")) and time.time() < deadline:
        if p.poll() is not None:
            pytest.fail("run ended before it could be killed:\n" + p.stdout.read())
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "adapter_model.safetensors").exists()  # it really died before finishing
    p = _cli(run)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert "resuming from" in out
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref)[0] == _losses(run)[0]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resumes(tmp_path):
    run = tmp_path / "run"
    p = _cli(run, "save_steps=100")
    deadline = time.time() + 300
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.exists() and '"loss"' in m.read_text():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 130, out
    assert "SIGTERM" in out and list(run.glob("checkpoint-*/COMPLETE"))
    p = _cli(run, "save_steps=100")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "resuming from" in out
