"""Merging: in memory (and back), merge_and_unload, and `qlora merge` checkpoints."""

import json
import shutil

import pytest
import torch
from lora_helpers import batch, logits, randomize_adapters, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from qlora.adapters.files import save_adapter
from qlora.adapters.merging import merge, merge_and_unload, merge_checkpoint, merged_weight, unmerge
from qlora.cli import main as cli_main
from qlora.lora.surgery import apply_lora, lora_modules
from quant import InputError, NF4Linear, quantize_model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_merge_then_unmerge_restores_exactly(nf4, use_dora):
    model = tiny_model("llama")
    if nf4:
        quantize_model(model, compute_dtype=torch.float32)
    apply_lora(model, "all-linear", rank=4, alpha=8.0, use_dora=use_dora, dtype=torch.float32)
    randomize_adapters(model)
    x = batch()
    before_sd, before = _snapshot(model), logits(model, x)
    assert merge(model) == 14
    merged = logits(model, x)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)  # merged logits equal the adapter model's
    assert all(isinstance(m.base_layer, nn.Linear) and m.merged for _, m in lora_modules(model))
    assert unmerge(model) == 14
    after = _snapshot(model)
    assert after.keys() == before_sd.keys() and all(torch.equal(after[k], before_sd[k]) for k in after)
    assert torch.equal(logits(model, x), before)


def test_merged_weight_is_fp32_math_rounded_once():
    base = nn.Linear(64, 48).to(torch.bfloat16)
    model = nn.Sequential(base)
    apply_lora(model, ["0"], rank=4, alpha=8.0)
    randomize_adapters(model)
    m = model[0]
    w = merged_weight(m)
    assert w.dtype == torch.bfloat16
    ref = base.weight.float() + m.scale * (m.lora_B.weight.float() @ m.lora_A.weight.float())
    assert torch.equal(w, ref.to(torch.bfloat16))


def test_keep_base_false_merges_in_place_and_cannot_unmerge():
    model = tiny_model("llama")
    apply_lora(model, "qv", rank=4, alpha=8.0, dtype=torch.float32)
    randomize_adapters(model)
    x = batch()
    ref = logits(model, x)
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    merge(model, keep_base=False)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight is w  # no new tensor
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="keep_base=False"):
        unmerge(model)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_gives_plain_model(use_dora):
    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    apply_lora(model, "attention", rank=4, alpha=8.0, use_dora=use_dora, dtype=torch.float32)
    randomize_adapters(model)
    x = batch()
    ref = logits(model, x)
    merge_and_unload(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- qlora merge (checkpoints)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A bf16 base checkpoint (with tokenizer files) and a random QLoRA adapter trained on its NF4 form."""
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model("llama", dtype=torch.bfloat16)
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (root / "base" / "chat_template.jinja").write_text("{{ messages }}")
    qmodel = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    quantize_model(qmodel)  # nf4, double quant, blocksize 64, bf16 compute: what training uses
    apply_lora(qmodel, "all-linear", rank=4, alpha=8.0)
    randomize_adapters(qmodel)
    save_adapter(qmodel, root / "adapter")
    return root, qmodel.eval()


def _expected_weights(root, into, adapter="adapter", fmt=("nf4", 64, True)):
    """W0 (16-bit or NF4-dequantized) + s·B·A in fp32, rounded once to bf16: computed independently here."""
    from safetensors.torch import load_file

    from quant import dequantize_4bit, quantize_4bit

    base = load_file(str(root / "base" / "model.safetensors"))
    ad = load_file(str(root / adapter / "adapter_model.safetensors"))
    out = {}
    for key, w in base.items():
        mod = key.removesuffix(".weight")
        a = ad.get(f"base_model.model.{mod}.lora_A.weight")
        if a is None:
            continue
        if into == "dequantized":
            w = dequantize_4bit(*quantize_4bit(w, *fmt), torch.float32)
        b = ad[f"base_model.model.{mod}.lora_B.weight"]
        out[key] = (w.float() + 2.0 * (b.float() @ a.float())).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("into", ["dequantized", "original"])
def test_qlora_merge_cli_output_loads_in_plain_transformers(trained, tmp_path, into, capsys):
    root, qmodel = trained
    out = tmp_path / "merged"
    rc = cli_main(
        ["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out), "--into", into]
    )
    assert rc == 0 and "14 modules merged" in capsys.readouterr().out
    wrote = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja"} <= wrote
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers: no qlora, no peft
    assert merged.dtype == torch.bfloat16
    assert not any(type(m).__module__.startswith(("qlora", "quant", "peft")) for m in merged.modules())
    sd = merged.state_dict()
    for key, w in _expected_weights(root, into).items():
        assert torch.equal(sd[key], w), key
    x = batch()
    err = (logits(merged, x) - logits(qmodel, x)).abs().max().item()
    if into == "dequantized":
        assert err < 0.02  # only bf16 rounding of W' separates it from NF4 base + adapter
    else:
        assert err > 0.02  # the NF4 quantization error of W0 is not there
    ref16 = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16).eval()
    assert (logits(merged, x) - logits(ref16, x)).abs().max() > 1e-2  # the adapter is in there


def test_merge_checkpoint_errors(trained, tmp_path):
    root, _ = trained
    with pytest.raises(InputError, match="--into 'requantized'"):
        merge_checkpoint(root / "base", root / "adapter", tmp_path / "o", into="requantized")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        merge_checkpoint(root / "base", root / "adapter", tmp_path / "full")
    with pytest.raises(InputError, match="no config.json"):
        merge_checkpoint(tmp_path, root / "adapter", tmp_path / "o")
    q4 = tmp_path / "q4"
    shutil.copytree(root / "base", q4)
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="no original 16-bit weights"):
        merge_checkpoint(q4, root / "adapter", tmp_path / "o", into="original")
    assert not (tmp_path / "o").exists()
    rc = cli_main([
        "merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "o"),
        "--weights", "1", "2",
    ])
    assert rc == 2


def test_merge_into_prequantized_base_equals_merge_from_16bit(trained, tmp_path):
    """A bnb 4-bit base (what training on a '-bnb-4bit' checkpoint uses) merges to the same bytes."""
    from safetensors.torch import load_file

    from quant import quantize_checkpoint

    root, _ = trained
    quantize_checkpoint(root / "base", tmp_path / "q4")
    merge_checkpoint(root / "base", root / "adapter", tmp_path / "m16", into="dequantized")
    merge_checkpoint(tmp_path / "q4", root / "adapter", tmp_path / "m4", into="dequantized")
    a, b = load_file(str(tmp_path / "m16" / "model.safetensors")), load_file(str(tmp_path / "m4" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantization_config" not in json.loads((tmp_path / "m4" / "config.json").read_text())
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "m4").model.layers[0].mlp.up_proj, nn.Linear)
    with pytest.raises(InputError, match="no original 16-bit weights"):
        merge_checkpoint(tmp_path / "q4", root / "adapter", tmp_path / "o", into="original")
    res = merge_checkpoint(tmp_path / "q4", root / "adapter", tmp_path / "auto")  # auto: the only weights there
    assert res.into == "dequantized" and "base checkpoint is 4-bit" in res.target.reason
    fp4 = _adapter_on(root, "adapter-fp4-q", ("fp4", 64, True))
    with pytest.raises(InputError, match="is nf4 with double_quant True.*an fp4 base"):
        merge_checkpoint(tmp_path / "q4", fp4, tmp_path / "o")


def test_qlora_merge_cli_combines_weighted_adapters(trained, tmp_path):
    root, _ = trained
    ad = str(root / "adapter")
    base = ["merge", "--base", str(root / "base"), "--into", "original", "--dtype", "float32"]
    assert cli_main(base + ["--adapter", ad, "--out", str(tmp_path / "one")]) == 0
    two_args = ["--adapter", ad, "--adapter", ad, "--weights", "1.5", "-0.5", "--out", str(tmp_path / "two")]
    assert cli_main(base + two_args) == 0
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    for k in one:  # 1.5·ΔW − 0.5·ΔW = ΔW, up to float32 summation order
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    assert two["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


# ---------------------------------------------------------------- --into auto: the adapter's record decides


def _adapter_on(root, name, fmt):
    """An adapter trained (randomly) on the base in ``fmt`` (a 4-bit format, or None: the 16-bit base itself)."""
    from quant import quantize_model

    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    if fmt is not None:
        quantize_model(model, *fmt)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    randomize_adapters(model, seed=len(name))
    save_adapter(model, root / name)
    return root / name


def _merged(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _assert_weights(out, expected):
    sd = _merged(out)
    assert all(torch.equal(sd[k], w) for k, w in expected.items())


def test_auto_merges_into_the_recorded_4bit_base_without_flags(trained, tmp_path, capsys):
    root, _ = trained
    capsys.readouterr()
    assert cli_main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"),
                     "--out", str(tmp_path / "nf4")]) == 0
    out = capsys.readouterr().out
    assert "merging into the dequantized nf4 base: the adapter was trained on it (adapter metadata)" in out
    _assert_weights(tmp_path / "nf4", _expected_weights(root, "dequantized"))
    fp4 = _adapter_on(root, "adapter-fp4", ("fp4", 128, False))
    res = merge_checkpoint(root / "base", fp4, tmp_path / "fp4")  # the API defaults to auto too
    assert res.into == "dequantized" and (res.target.quant_type, res.target.blocksize) == ("fp4", 128)
    assert res.target.double_quant is False
    _assert_weights(tmp_path / "fp4", _expected_weights(root, "dequantized", "adapter-fp4", ("fp4", 128, False)))


def test_auto_merges_16bit_and_unrecorded_adapters_into_the_original_weights(trained, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    root, _ = trained
    plain = _adapter_on(root, "adapter-16bit", None)
    capsys.readouterr()
    assert cli_main(["merge", "--base", str(root / "base"), "--adapter", str(plain), "--out", str(tmp_path / "a")]) == 0
    assert "merging into the original 16-bit base: the adapter was trained on it (adapter metadata)" in (
        capsys.readouterr().out
    )
    _assert_weights(tmp_path / "a", _expected_weights(root, "original", "adapter-16bit"))
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
    )
    peft_model.save_pretrained(str(root / "peft"))
    res = merge_checkpoint(root / "base", root / "peft", tmp_path / "p")
    assert res.into == "original" and "records no base" in res.target.reason
    # no record, but a format given: the flags say which 4-bit base it was trained on
    res = merge_checkpoint(root / "base", root / "peft", tmp_path / "p4", quant_type="fp4")
    assert res.into == "dequantized" and res.target.quant_type == "fp4"


def test_flags_that_contradict_the_record_are_refused(trained, tmp_path, capsys):
    root, _ = trained
    ad, base = str(root / "adapter"), str(root / "base")
    capsys.readouterr()
    rc = cli_main(["merge", "--base", base, "--adapter", ad, "--out", str(tmp_path / "o"), "--into", "dequantized",
                   "--quant-type", "fp4"])
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its one paragraph
    assert rc == 2 and "'fp4'" in err and "--quant-type" in err and "an nf4 base (blocksize 64" in err
    for kw in (dict(blocksize=128), dict(double_quant=False)):
        with pytest.raises(InputError, match="contradicts the adapter"):
            merge_checkpoint(base, ad, tmp_path / "o", **kw)
    merge_checkpoint(base, ad, tmp_path / "same", quant_type="nf4", blocksize=64)  # agreeing flags are fine
    with pytest.raises(InputError, match="--quant-type 'none'.*'nf4' or 'fp4'.*--into original"):
        merge_checkpoint(base, ad, tmp_path / "o", quant_type="none")
    plain = _adapter_on(root, "adapter-16bit-b", None)
    with pytest.raises(InputError, match="16-bit base.*--into dequantized"):
        merge_checkpoint(base, plain, tmp_path / "o", quant_type="nf4")
    res = merge_checkpoint(base, plain, tmp_path / "asked", into="dequantized")  # asked for explicitly: done
    assert res.into == "dequantized" and "as asked" in res.target.reason and "16-bit" in res.target.reason
    assert not (tmp_path / "o").exists()


def test_combining_adapters_trained_on_different_bases_is_refused(trained, tmp_path, capsys):
    root, _ = trained
    plain = _adapter_on(root, "adapter-16bit-c", None)
    capsys.readouterr()
    rc = cli_main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--adapter", str(plain),
                   "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "different bases" in err and "adapter-16bit-c" in err and "an nf4 base" in err
    assert not (tmp_path / "o").exists()
    rc = cli_main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--adapter",
                   str(root / "adapter"), "--weights", "0.5", "0.5", "--out", str(tmp_path / "same")])
    assert rc == 0 and "merging into the dequantized nf4 base" in capsys.readouterr().out
