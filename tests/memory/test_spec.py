"""Model specs: shapes come out exactly as transformers builds the model."""

import json

import pytest
import torch
from arch_configs import ARCHS
from transformers import AutoModelForCausalLM

import memory
from memory.footprint import weight_terms
from memory.meta import build_config
from quant import NF4Linear, bits_per_param, quantize_model
from quant.errors import InputError


def _real_model(facts):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config(facts), dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_spec_matches_the_instantiated_and_quantized_model(arch):
    facts = ARCHS[arch]
    spec = memory.spec_from_config(facts, name=arch)
    model = _real_model(facts)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    quantize_model(model)  # the same skip rule the spec uses: lm_head/output embedding stays 16-bit
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert spec.quantized_params == sum(m.in_features * m.out_features for m in nf4)
    assert len([lin for lin in spec.linears if lin.quantized]) == len(nf4)
    nf4_biases = sum(m.bias.numel() for m in nf4 if m.bias is not None)
    assert spec.frozen_16bit_params == sum(p.numel() for p in model.parameters()) + nf4_biases
    # 4-bit storage, element for element (CPU shares one nested code table between layers)
    shared = {}
    actual = 0
    for m in nf4:
        for name, b in m.named_buffers():
            if name == "bias":
                continue
            if name == "nested_quant_map":
                shared[b.untyped_storage()._cdata] = b.numel() * b.element_size()
            else:
                actual += b.numel() * b.element_size()
    assert weight_terms(spec, device="cpu")["nf4_weights"] == actual + sum(shared.values())


def test_arch_specifics_come_out_of_the_model_not_formulas():
    phi3 = memory.spec_from_config(ARCHS["phi3"], "phi3")
    assert set(phi3.linear_shorts()) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    qkv = next(lin for lin in phi3.linears if lin.short == "self_attn.qkv_proj")
    assert qkv.out_features == 128 + 2 * 4 * 32  # q + k + v heads of 32
    gemma = memory.spec_from_config(ARCHS["gemma2"], "gemma2")
    q = next(lin for lin in gemma.linears if lin.short == "self_attn.q_proj")
    assert q.out_features == 4 * 32 and gemma.tied_embeddings and gemma.frozen_16bit["lm_head"] == 0
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    qwen = memory.spec_from_config(ARCHS["qwen2"], "qwen2")
    assert qwen.frozen_16bit["linear biases"] == 3 * (128 + 64 + 64)  # q/k/v biases stay 16-bit
    odd = memory.spec_from_config(ARCHS["llama-odd"], "odd")
    k = next(lin for lin in odd.linears if lin.short == "self_attn.k_proj")
    assert k.out_features == 32 and any(lin.out_features == 333 for lin in odd.linears)


@pytest.mark.parametrize(
    "name, total",
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.1-70b", 70_553_706_496),
        ("mistral-7b-v0.3", 7_248_023_552),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen2.5-0.5b", 494_032_768),
        ("gemma-2-9b", 9_241_705_984),
        ("phi-3.5-mini", 3_821_079_552),
    ],
)
def test_catalog_matches_published_parameter_counts(name, total):
    assert memory.load_spec(name).total_params == total


def test_llama_8b_nf4_term_is_6_98e9_params_at_4_127_bits():
    spec = memory.load_spec("llama-3.1-8b")
    assert spec.quantized_params == 6_979_321_856
    nf4 = weight_terms(spec)["nf4_weights"]
    expected = spec.quantized_params * bits_per_param("nf4", 64, True) / 8
    assert abs(nf4 - expected) / expected < 1e-4  # per-layer code tables are the only extra
    assert weight_terms(spec)["embeddings_16bit"] == weight_terms(spec)["lm_head_16bit"] == 128256 * 4096 * 2


def test_default_model_is_llama_3_1_8b():
    assert memory.DEFAULT_MODEL == "llama-3.1-8b"
    assert memory.load_spec().name == "llama-3.1-8b"


def test_spec_from_config_file_and_folder_but_not_a_recipe(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(ARCHS["llama"]))
    by_dir = memory.load_spec(str(tmp_path / "m"))
    by_file = memory.load_spec(str(tmp_path / "m" / "config.json"))
    assert by_dir.total_params == by_file.total_params == memory.spec_from_config(ARCHS["llama"]).total_params
    # recipes are the trainer's: memory points to `qlora plan --model RECIPE.yaml` (tests/qlora/test_plan_recipes.py)
    (tmp_path / "nested.yaml").write_text("model:\n  path: m\n")
    for recipe in (tmp_path / "nested.yaml", tmp_path / "missing.yml"):
        with pytest.raises(InputError, match=r"qlora plan --model .*\.ya?ml"):
            memory.load_spec(str(recipe))
    assert not hasattr(memory, "spec_from_recipe")


def test_bad_models_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="Unknown model 'llama-9b'.*llama-3.1-8b"):
        memory.load_spec("llama-9b")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "vocab_size": 100}))
    with pytest.raises(InputError, match="not a decoder-only causal language model"):
        memory.load_spec(str(bert))
    (tmp_path / "t5.json").write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 2,
                                                  "vocab_size": 100}))
    with pytest.raises(InputError, match="not a decoder-only causal language model"):
        memory.load_spec(str(tmp_path / "t5.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        memory.load_spec(str(tmp_path / "empty"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        memory.load_spec(str(tmp_path / "broken.json"))
    (tmp_path / "nomodel.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(InputError, match="model_type"):
        memory.load_spec(str(tmp_path / "nomodel.json"))
