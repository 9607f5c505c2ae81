"""quant_type none: the loader streams a 16-bit checkpoint into plain nn.Linear layers (the plain-LoRA baseline)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import input_ids, logits, save_tiny
from torch import nn
from transformers import AutoModelForCausalLM

from quant import InputError, NF4Linear, load_quantized_model, quantize_checkpoint


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_none_loads_the_checkpoint_as_transformers_does(tmp_path, arch):
    src = save_tiny(arch, tmp_path / "bf16")
    model = load_quantized_model(src, quant_type="none", blocksize=48)  # the blocksize is unused, not checked
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.bfloat16 and not model.training
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(logits(model, input_ids()), logits(ref, input_ids()))


def test_none_casts_to_the_requested_dtype(tmp_path):
    src = save_tiny("llama", tmp_path / "fp32", dtype=torch.float32)
    model = load_quantized_model(src, quant_type="none", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_none_refuses_a_4bit_checkpoint(tmp_path):
    src = save_tiny("llama", tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "q4")
    with pytest.raises(InputError) as e:
        load_quantized_model(tmp_path / "q4", quant_type="none")
    msg = str(e.value)
    assert "bitsandbytes 4-bit checkpoint" in msg and "'none'" in msg and "'nf4'" in msg and "\n" not in msg


def test_unknown_quant_type_lists_none_among_the_choices(tmp_path):
    with pytest.raises(InputError, match=r"'int4'.*'nf4', 'fp4' or 'none'"):
        load_quantized_model(tmp_path, quant_type="int4")
