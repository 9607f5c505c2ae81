"""Footprint terms: closed-form storage arithmetic against the real objects, and input checks."""

import pytest
import torch
from arch_configs import ARCHS

import memory
from memory.terms import optimizer_state_bytes
from qlora.train.optim import build_optimizer
from quant.errors import InputError


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.untyped_storage()._cdata not in seen:
                seen.add(v.untyped_storage()._cdata)
                total += v.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_optimizer_state_matches_the_real_optimizer_on_cpu(name, dtype):
    # one tensor below bitsandbytes' 4096-element threshold, one above it, one above the 1e5 paging threshold
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (1000, 5000, 100_001)]
    opt = build_optimizer([{"params": params}], name)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    predicted = sum(optimizer_state_bytes(p.numel(), p.element_size(), name, "cpu")[0] for p in params)
    shared = 2 * 256 * 4 if name.endswith("8bit") else 0  # the two quantization maps, once per optimizer
    assert _state_bytes(opt) == predicted + shared


def test_paged_state_is_host_backed_on_cuda_only_for_large_tensors():
    dev, host = optimizer_state_bytes(100_000, 2, "paged_adamw_8bit", "cuda")
    assert host == 2 * 100_000 and dev == 2 * 4 * -(-100_000 // 256)  # moments paged, absmax on the GPU
    assert optimizer_state_bytes(99_999, 2, "paged_adamw_8bit", "cuda")[1] == 0
    assert optimizer_state_bytes(100_000, 2, "paged_adamw_8bit", "cpu")[1] == 0


def test_breakdown_sums_to_the_peak_and_phases_are_consistent():
    spec = memory.spec_from_config(ARCHS["llama"], "llama")
    fp = memory.estimate(spec, seq_len=64, micro_batch_size=2, rank=8, device="cpu", optimizer="adamw")
    assert sum(fp.breakdown.values()) == fp.tensor_peak_bytes == max(fp.phases.values())
    assert fp.phases[fp.peak_phase] == fp.tensor_peak_bytes
    assert set(fp.breakdown) == set(memory.TERMS)
    assert fp.cuda_context_bytes == fp.allocator_reserve_bytes == 0  # CPU: nothing outside the tensors
    gpu = memory.estimate(spec, seq_len=64, micro_batch_size=2, rank=8)
    assert gpu.device_total_bytes == gpu.tensor_peak_bytes + gpu.cuda_context_bytes + gpu.allocator_reserve_bytes
    assert gpu.cuda_context_bytes > 0 and gpu.allocator_reserve_bytes > 0


def test_settings_move_the_terms_they_should():
    spec = memory.spec_from_config(ARCHS["llama"], "llama")
    est = lambda **kw: memory.estimate(spec, **dict(dict(seq_len=64, micro_batch_size=2, rank=8, device="cpu"), **kw))  # noqa: E731
    base = est()
    assert est(rank=16).breakdown["lora_params"] == 2 * base.breakdown["lora_params"]
    assert est(gradient_checkpointing=False).phases["loss"] > base.phases["loss"]
    assert est(seq_len=128).tensor_peak_bytes > base.tensor_peak_bytes
    assert base.loss == "chunked" and base.loss_chunk_tokens == 1024  # the trainer's defaults
    chunked16, hf = est(loss="chunked", loss_chunk_tokens=16), est(loss="hf")
    assert chunked16.phases["loss"] < base.phases["loss"] < hf.phases["loss"]
    assert est(targets="qv").lora_params < base.lora_params
    assert est(attn="eager").phases["backward"] > base.phases["backward"]  # s x s attention scores


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=1), "seq_len"),
        (dict(micro_batch_size=-1), "micro_batch_size"),
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(adapter_dtype="int8"), "adapter dtype"),
        (dict(dropout=1.0), "dropout"),
        (dict(attn="flash"), "attention"),
        (dict(loss="focal"), "loss"),
        (dict(targets="nonexistent_proj"), "nonexistent_proj"),
        (dict(targets=r"model\.layers\.0\..*"), "only some decoder layers"),
    ],
)
def test_bad_settings_raise_input_errors(kw, match):
    spec = memory.spec_from_config(ARCHS["llama"], "llama")
    with pytest.raises(InputError, match=match):
        memory.estimate(spec, **kw)


def test_sdpa_refused_where_the_architecture_has_none():
    spec = memory.spec_from_config(ARCHS["gemma2"], "gemma2")
    with pytest.raises(InputError, match="eager"):
        memory.estimate(spec, attn="sdpa")


def test_offloaded_checkpoints_leave_the_gpu_but_not_the_cpu():
    kw = dict(model="llama-3.1-8b", seq_len=8192, micro_batch_size=1, loss="chunked")
    on, off = memory.estimate(**kw, offload_activations=True), memory.estimate(**kw)
    per_layer = 2 * 8192 * 4096  # bf16 layer input, hidden 4096
    moved = (32 - 2) * per_layer
    assert on.offload_activations and not off.offload_activations
    assert on.host_bytes - off.host_bytes == 32 * per_layer
    assert off.tensor_peak_bytes - on.tensor_peak_bytes == pytest.approx(moved, rel=0.02)
    cpu_on = memory.estimate(**kw, device="cpu", offload_activations=True)
    assert cpu_on.tensor_peak_bytes == memory.estimate(**kw, device="cpu").tensor_peak_bytes  # a no-op move on CPU


def test_a_16bit_base_costs_its_linears_at_2_bytes_each():
    """quant_type none (plain LoRA): the base linears move from nf4_weights to base_weights_16bit."""
    spec = memory.load_spec("llama-3.1-8b")
    nf4, none = memory.estimate(spec, seq_len=1024), memory.estimate(spec, seq_len=1024, quant_type="none")
    assert none.breakdown["nf4_weights"] == 0 and nf4.breakdown["base_weights_16bit"] == 0
    assert none.breakdown["base_weights_16bit"] == 2 * spec.quantized_params
    assert none.breakdown["dequantized_weight"] == 0 and none.quant_type == "none" and none.nf4_bits_per_param == 16
    per_param = (none.tensor_peak_bytes - nf4.tensor_peak_bytes) / spec.quantized_params
    assert per_param == pytest.approx((16 - 4.127) / 8, rel=1e-3)
    assert none.lora_params == nf4.lora_params  # the same linears get adapters
    with pytest.raises(InputError, match=r"'int4'.*'nf4', 'fp4' or 'none'"):
        memory.Settings(quant_type="int4")


def test_packed_rows_add_the_block_mask_under_sdpa_only():
    """Packed rows: transformers' (b, 1, s, s) bool mask held all step, plus sdpa's bf16 copy during a call."""
    spec = memory.spec_from_config(ARCHS["llama"], "llama")
    b, s = 2, 512
    plain = memory.estimate(spec, seq_len=s, micro_batch_size=b, device="cpu")
    packed = memory.estimate(spec, seq_len=s, micro_batch_size=b, device="cpu", packed=True)
    assert "block_mask" not in plain.breakdown or plain.breakdown["block_mask"] == 0
    assert packed.phases["backward"] - plain.phases["backward"] == 3 * b * s * s
    assert packed.phases["loss"] - plain.phases["loss"] == b * s * s  # held, no attention call running
    assert packed.phases["optimizer"] == plain.phases["optimizer"]
    eager = [memory.estimate(spec, seq_len=s, micro_batch_size=b, device="cpu", attn="eager", packed=p)
             for p in (False, True)]
    assert eager[0].phases == eager[1].phases  # eager builds a dense mask packed or not: it is in the profile


def test_packed_rows_add_no_mask_where_every_layer_slides_past_its_window():
    slides = memory.spec_from_config(dict(ARCHS["mistral"], sliding_window=64), "mistral-sw")
    for s, extra in ((256, 0), (48, 3 * 2 * 48 * 48)):  # past the window the mask exists unpacked too
        plain, packed = (memory.estimate(slides, seq_len=s, micro_batch_size=2, device="cpu", packed=p)
                         for p in (False, True))
        assert packed.phases["backward"] - plain.phases["backward"] == extra
