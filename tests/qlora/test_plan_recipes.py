"""Recipes and the planner: `qlora plan --model RECIPE.yaml` plans a recipe exactly as `qlora train` does.

One mapping turns a recipe into memory.Settings (qlora.train.plan.settings_from_recipe), one turns
settings back into a recipe (settings_to_recipe), and one function plans a recipe (plan_recipe) and
one prints it (plan_summary), for both commands.
"""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from qlora.cli import main
from qlora.train.recipe import load_recipe
from quant.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
LONG = ROOT / "recipes" / "llama-3.1-8b-128k-24gb.yaml"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


def _plan(capsys, *argv):
    capsys.readouterr()
    rc = main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(capsys, *argv):
    rc, out, err = _plan(capsys, *argv, "--json")
    assert rc in (0, 1), err
    return json.loads(out)


def _expected_json(recipe, **kw):
    """What `qlora plan --json` must print for ``recipe``: plan_recipe's plan, in the CLI's JSON form."""
    from qlora.cli.plan import plan_dict
    from qlora.train.plan import plan_recipe

    return json.loads(json.dumps(plan_dict(plan_recipe(recipe, **kw), recipe.lora.alpha)))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_prints_the_plan_qlora_train_prints(capsys, path):
    from qlora.train.plan import model_label, plan_recipe, plan_summary

    recipe = load_recipe(path)
    expected = plan_summary(plan_recipe(recipe), model_label(recipe)).splitlines()
    rc, out, err = _plan(capsys, "--model", path)
    assert rc == 0, err
    assert out.splitlines()[: len(expected)] == expected  # the very lines, first, unwrapped
    assert "tensor peak" in out and "device total" in out  # then the full table


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_plans_with_its_own_settings(capsys, path):
    recipe = load_recipe(path)
    d = _json(capsys, "--model", path)
    assert d == _expected_json(recipe)
    assert d["fits"] and d["lora_alpha"] == recipe.lora.alpha and d["dropout"] == recipe.lora.dropout
    assert d["optimizer"] == recipe.optimizer.name and d["gradient_checkpointing"] == recipe.gradient_checkpointing
    assert d["loss"] == ("chunked" if recipe.chunked_loss else "hf")
    assert d["effective_batch_size"] == recipe.effective_batch_size
    for key in ("seq_len", "micro_batch_size"):
        if getattr(recipe, key) != "auto":
            assert d[key] == getattr(recipe, key)
    if recipe.gpu:  # --gpu defaults to the recipe's own budget, and a named GPU means a CUDA run
        assert d["gpu"]["name"] == recipe.gpu and d["cuda_context_bytes"] > 0


def test_builtin_recipe_with_gpu_flag_is_planned_from_its_config_without_weights(capsys, tmp_path, monkeypatch):
    """The bug: `qlora plan --gpu 24GB --model recipes/tiny-cpu.yaml` failed on the project's own default recipe."""
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    d = _json(capsys, "--gpu", "24GB", "--model", TINY)
    assert d == _expected_json(load_recipe(TINY), gpu="24GB")
    assert d["fits"] and d["gpu"]["name"] == "24GB" and d["seq_len"] == 256 and d["dropout"] == 0.05
    assert d["cuda_context_bytes"] > 0  # --gpu names a GPU: planned as a CUDA run
    cached = {p.name for p in (tmp_path / "cache").iterdir()} if (tmp_path / "cache").exists() else set()
    assert cached <= {"planner"}  # no weights materialized to plan (the planner may cache its profiles)


def test_recipe_without_gpu_is_budgeted_like_qlora_train(capsys):
    import psutil

    d = _json(capsys, "--model", TINY)  # tiny-cpu names no gpu: this machine's memory, this machine's device
    if torch.cuda.is_available():
        assert d["cuda_context_bytes"] > 0
    else:
        assert d["gpu"]["name"] == "this machine's RAM" and d["cuda_context_bytes"] == 0
        assert d["gpu"]["total_bytes"] == psutil.virtual_memory().total
        assert d["gpu"]["note"] == ""  # a measured budget: no "24105MiB read as 23.54 GiB" to explain


def test_train_logs_the_summary_plan_prints(capsys, tmp_path):
    from qlora.train.plan import model_label, plan_recipe, plan_run, plan_summary

    recipe = load_recipe(TINY, ["gpu=2GB", "lora.rank=auto", f"output_dir={tmp_path}"])
    logged = plan_run(recipe, torch.device("cpu")).summary
    assert logged == plan_summary(plan_recipe(recipe, device="cpu"), model_label(recipe))
    rc, out, err = _plan(capsys, "--model", TINY, "--gpu", "2GB", "--rank", "auto", "--device", "cpu")
    assert rc == 0, err
    assert out.splitlines()[: len(logged.splitlines())] == logged.splitlines()
    assert "rank auto: 256" in logged


def test_flags_given_override_the_recipe_and_the_rest_stays(capsys):
    recipe = load_recipe(LONG)  # seq_len auto, micro-batch 1, effective 8, offloading, dropout 0, chunked loss
    assert yaml.safe_load(LONG.read_text())["chunked_loss"] is True
    d = _json(capsys, "--model", LONG, "--seq-len", "8192", "--rank", "32", "--dropout", "0.1")
    assert d == _expected_json(recipe, seq_len=8192, rank=32, dropout=0.1)
    assert (d["seq_len"], d["rank"], d["dropout"]) == (8192, 32, 0.1)
    assert (d["micro_batch_size"], d["effective_batch_size"]) == (1, 8)
    kept = _json(capsys, "--model", LONG, "--seq-len", "8192", "--no-gradient-checkpointing")
    assert kept["host_bytes"] < d["host_bytes"]  # the recipe's offloading was applied (it needs checkpointing)
    assert _json(capsys, "--model", LONG, "--seq-len", "2048", "--hf-loss")["loss"] == "hf"


def test_chunked_and_hf_loss_flags_contradict(capsys):
    rc, _, err = _plan(capsys, "--model", TINY, "--hf-loss", "--chunked-loss", "512")
    assert rc == 2 and "--hf-loss" in err and "--chunked-loss" in err and "contradict" in err


def test_a_catalog_model_still_needs_gpu(capsys):
    for argv in ([], ["--model", "llama-3.1-8b"], ["--model", "builtin:tiny-llama", "--rank", "8"]):
        rc, _, err = _plan(capsys, *argv)
        assert rc == 2 and err.startswith("error:") and "--gpu is required" in err and "recipe" in err


def test_relative_model_folder_in_a_recipe(capsys, tmp_path):
    import memory
    from qlora.train.plan import plan_recipe

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "r.yaml").write_text("model:\n  path: m\nseq_len: 64\ngpu: 4GB\n")
    p = plan_recipe(load_recipe(tmp_path / "r.yaml"))
    assert p.footprint.quantized_params == memory.spec_from_config(LLAMA).quantized_params
    assert _json(capsys, "--model", tmp_path / "r.yaml")["quantized_params"] == p.footprint.quantized_params


def test_out_from_a_recipe_keeps_the_recipe_and_plans_the_same_again(capsys, tmp_path):
    out = tmp_path / "planned.yaml"
    rc, _, err = _plan(capsys, "--model", TINY, "--gpu", "8GB", "--rank", "auto", "--out", out)
    assert rc == 0, err
    written = load_recipe(out)
    tiny = load_recipe(TINY)
    assert written.data.path == tiny.data.path and written.optimizer.lr == tiny.optimizer.lr
    assert written.lora.rank == 256 and written.gpu == "8GB" and written.micro_batch_size != "auto"
    first = _json(capsys, "--model", TINY, "--gpu", "8GB", "--rank", "auto")
    again = _json(capsys, "--model", out)
    for key in ("peak_bytes", "tensor_peak_bytes", "seq_len", "micro_batch_size", "rank", "breakdown"):
        assert again[key] == first[key], key


def test_recipe_settings_round_trip():
    import memory
    from qlora.train.plan import settings_from_recipe, settings_to_recipe
    from qlora.train.recipe import recipe_from_dict, recipe_to_dict

    for path in RECIPES:
        recipe = load_recipe(path)
        s = settings_from_recipe(recipe)
        assert settings_from_recipe(recipe_from_dict(settings_to_recipe(s, recipe_to_dict(recipe)))) == s
    odd = memory.Settings(
        seq_len=300, micro_batch_size=3, rank="auto", effective_batch_size=9, targets=("q_proj", "v_proj"),
        dropout=0.1, dora=True, adapter_dtype="float32", optimizer="adamw", attn="eager", loss="hf",
        offload_activations=True, quant_type="fp4", blocksize=128, double_quant=False, device="cpu",
    )
    assert settings_from_recipe(recipe_from_dict(settings_to_recipe(odd))) == odd
    unwritable = [(dict(adapter_dtype="float16"), "lora.dtype"), (dict(loss="chunked", loss_chunk_tokens=512), "512"),
                  (dict(attn="auto"), "auto")]
    for bad, needle in unwritable:
        with pytest.raises(InputError, match=needle):
            settings_to_recipe(odd.changed(**bad))


def test_gpu_recipe_headers_quote_the_planner():
    """Each GPU recipe's header numbers are what the planner predicts today for its settings (no stale claims)."""
    from qlora.train.plan import plan_recipe

    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if load_recipe(path).gpu is None:  # CPU recipes (tiny-cpu, smollm2-json) quote no GPU plan
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


def test_a_16bit_base_recipe_is_planned_as_plain_lora(capsys):
    """quant.quant_type: none reaches the planner (and back): the base linears are counted at 16 bits."""
    from qlora.train.plan import plan_recipe, settings_from_recipe, settings_to_recipe
    from qlora.train.recipe import recipe_from_dict

    recipe = load_recipe(TINY, ["quant.quant_type=none"])
    s = settings_from_recipe(recipe)
    assert s.quant_type == "none" and settings_from_recipe(recipe_from_dict(settings_to_recipe(s))) == s
    none, nf4 = plan_recipe(recipe).footprint, plan_recipe(load_recipe(TINY)).footprint
    assert none.breakdown["base_weights_16bit"] == 2 * none.quantized_params and none.breakdown["nf4_weights"] == 0
    assert none.tensor_peak_bytes > nf4.tensor_peak_bytes
    assert _json(capsys, "--model", TINY, "--quant-type", "none")["quant_type"] == "none"


def test_a_gpu_run_whose_host_side_does_not_fit_this_machine_is_refused(monkeypatch):
    """qlora train checks this machine's RAM even when the recipe names a GPU budget: the run happens here."""
    import importlib

    from qlora.train.plan import plan_run

    memory_plan = importlib.import_module("memory.plan")  # the module (memory.plan the name is the function)
    monkeypatch.setattr(memory_plan, "available_ram", lambda: 2 * 2**30)  # the process alone needs 2.5 GiB
    recipe = load_recipe(TINY, ["device=cuda", "gpu=24GB"])
    with pytest.raises(InputError, match=r"does not fit this machine's RAM: the host side needs 2\.\d\d GiB") as e:
        plan_run(recipe, torch.device("cuda"))
    assert "1.90 GiB of the available RAM is usable" in str(e.value)
