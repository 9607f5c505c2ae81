"""`qlora plan`: the plan for the default model, its JSON, its recipe, and clean errors."""

import json

import pytest
import yaml

from qlora.cli import main


def _plan(capsys, *argv):
    capsys.readouterr()
    rc = main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_plan_for_llama_3_1_8b_on_24gb(capsys):
    rc, out, err = _plan(capsys, "--gpu", "24GB")
    assert rc == 0, err
    assert "llama-3.1-8b" in out and "fits" in out
    assert "6.98e9 params x 4.127 bits" in out
    assert "GiB" in out and "vendors" in out  # the GB-means-GiB note
    assert "tensor peak" in out and "CUDA context" in out


def test_json_has_the_stable_keys(capsys):
    rc, out, _ = _plan(capsys, "--gpu", "rtx4090", "--json")
    d = json.loads(out)
    for key in ("fits", "budget_bytes", "peak_bytes", "micro_batch_size", "gradient_accumulation_steps", "rank",
                "seq_len", "model", "gpu", "breakdown"):
        assert key in d, key
    assert rc == 0 and d["fits"] is True and d["model"] == "llama-3.1-8b"
    assert d["gpu"]["name"] == "rtx4090" and d["budget_bytes"] == 24564 * 2**20
    assert d["peak_bytes"] == d["tensor_peak_bytes"] + d["cuda_context_bytes"] + d["allocator_reserve_bytes"]
    assert sum(d["breakdown"].values()) == d["tensor_peak_bytes"]
    assert d["micro_batch_size"] * d["gradient_accumulation_steps"] == d["effective_batch_size"]


def test_out_writes_a_recipe_and_not_fitting_exits_1(capsys, tmp_path):
    recipe = tmp_path / "r" / "plan.yaml"
    rc, _, err = _plan(capsys, "--gpu", "8GB", "--model", "builtin:tiny-llama", "--rank", "auto", "--out", recipe)
    assert rc == 0, err
    from qlora.train.recipe import load_recipe

    r = load_recipe(recipe)  # what plan writes is a recipe the trainer accepts
    assert r.lora.rank == 256 and r.effective_batch_size == 16 and 16 % r.micro_batch_size == 0
    assert r.model.path == "builtin:tiny-llama" and r.gradient_checkpointing is True and r.chunked_loss is True
    assert yaml.safe_load(recipe.read_text())["gpu"] == "8GB"
    rc, out, err = _plan(capsys, "--gpu", "4GB", "--model", "llama-3.1-8b", "--out", tmp_path / "no.yaml")
    assert rc == 2 and "no recipe was written" in err and not (tmp_path / "no.yaml").exists()
    assert "does not fit" in out and "bigger GPU" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--gpu", "24XB"], "24XB"),
        (["--gpu", "rtx9999"], "rtx9999"),
        (["--gpu", "24GB", "--model", "llama-9b"], "llama-9b"),
        (["--gpu", "24GB", "--model", "builtin:nope"], "builtin:nope"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--seq-len", "0"], "seq_len"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--batch-size", "-1"], "micro_batch_size"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--rank", "0"], "rank"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--seq-len", "long"], "--seq-len"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--optimizer", "sgd"], "sgd"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--quant-type", "int4"], "'none'"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--tiled-mlp", "maybe"], "auto, on or off"),
        (["--gpu", "24GB", "--model", "builtin:tiny-llama", "--tile-tokens", "0"], "tile_tokens"),
    ],
)
def test_bad_input_is_one_clear_error_with_exit_2(capsys, argv, needle):
    rc, _, err = _plan(capsys, *argv)
    assert rc == 2
    assert err.startswith("error:") and needle in err and "Traceback" not in err


def test_non_causal_config_is_refused(capsys, tmp_path):
    bert = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "vocab_size": 30522}
    (tmp_path / "config.json").write_text(json.dumps(bert))
    rc, _, err = _plan(capsys, "--gpu", "24GB", "--model", tmp_path)
    assert rc == 2 and "not a decoder-only causal language model" in err and "Traceback" not in err


def test_a_config_without_the_model_sizes_is_refused_naming_them(capsys, tmp_path):
    """{"model_type": "llama"} alone would be planned as LlamaConfig's default 7B model: refused instead."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    rc, _, err = _plan(capsys, "--gpu", "24GB", "--model", tmp_path)
    err = " ".join(err.split())
    assert rc == 2 and "does not give num_hidden_layers, num_attention_heads, vocab_size" in err, err
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))  # its own names for the sizes count (then: no Conv1D)
    rc, out, err = _plan(capsys, "--gpu", "24GB", "--model", tmp_path)
    assert rc == 2 and "does not give" not in err and "not a decoder-only" in err, err


def test_setting_flags_are_generated_from_memory_settings():
    import argparse
    import dataclasses

    import memory
    from qlora.cli.plan import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub, "plan", "")
    parser = sub.choices["plan"]
    by_dest = {a.dest: a for a in parser._actions}
    flags = {f.name: f.metadata["flag"] for f in dataclasses.fields(memory.Settings) if "flag" in f.metadata}
    assert {"seq_len", "micro_batch_size", "rank", "optimizer", "loss", "loss_chunk_tokens", "device"} <= set(flags)
    for name, flag in flags.items():
        assert by_dest[name].option_strings == [flag.name] and flag.help in by_dest[name].help
    assert set(by_dest) - set(flags) == {"help", "gpu", "model", "ram", "alpha", "json", "out"}  # nothing written twice


def test_flags_reach_the_plan(capsys):
    rc, out, _ = _plan(capsys, "--gpu", "24GB", "--model", "qwen2.5-0.5b", "--seq-len", "1024", "--batch-size", "2",
                       "--rank", "8", "--targets", "self_attn.q_proj", "self_attn.v_proj", "--dora", "--hf-loss",
                       "--optimizer", "adamw", "--no-gradient-checkpointing", "--device", "cpu", "--json")
    d = json.loads(out)
    assert rc == 0 and (d["seq_len"], d["micro_batch_size"], d["rank"]) == (1024, 2, 8)
    assert d["targets"] == ["self_attn.q_proj", "self_attn.v_proj"] and d["dora"] and d["loss"] == "hf"
    assert d["optimizer"] == "adamw" and not d["gradient_checkpointing"] and d["cuda_context_bytes"] == 0


def test_quant_type_none_plans_a_16bit_base(capsys):
    rc, out, err = _plan(capsys, "--gpu", "24GB", "--quant-type", "none", "--seq-len", "1024")
    assert rc == 0, err
    assert "base linears (16-bit) (6.98e9 params x 16.000 bits)" in out and "4-bit weights" not in out
    rc, out, _ = _plan(capsys, "--gpu", "24GB", "--quant-type", "none", "--json")
    d = json.loads(out)
    assert d["quant_type"] == "none" and d["breakdown"]["nf4_weights"] == 0
    assert d["breakdown"]["base_weights_16bit"] == 2 * d["quantized_params"]


def test_long_context_plan_says_what_is_tiled(capsys):
    argv = ("--gpu", "24GB", "--model", "llama-3.1-8b", "--seq-len", "auto", "--batch-size", "1", "--rank", "32",
            "--offload-activations")
    rc, out, _ = _plan(capsys, *argv)
    assert rc == 0 and "inputs offloaded | MLP and norms in tiles of 4096 tokens" in " ".join(out.split())
    d = json.loads(_plan(capsys, *argv, "--tiled-norms", "off", "--json")[1])
    assert (d["tiled_mlp"], d["tiled_norms"], d["tile_tokens"]) == (True, False, 4096) and d["seq_len"] < 110_000
    d = json.loads(_plan(capsys, *argv, "--tiled-mlp", "off", "--tiled-norms", "off", "--json")[1])
    assert d["tile_tokens"] is None and d["offload_activations"] is True and 60_000 < d["seq_len"] < 64_000
