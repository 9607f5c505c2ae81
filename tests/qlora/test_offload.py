"""Offloaded gradient checkpointing: same gradients, and exactly the layer inputs go through the hooks."""

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from qlora.lora.surgery import apply_lora, lora_parameters
from qlora.train.loss import causal_lm_loss
from qlora.train.offload import ActivationOffloader, offload_checkpointed_inputs, offloader_of
from qlora.train.recipe import recipe_from_dict
from qlora.train.setup import enable_checkpointing
from quant import InputError, quantize_model

LAYERS, B, S, H = 3, 2, 16, 128


def _model(device="cpu", checkpointing=True):
    """Tiny NF4 Llama + LoRA (dropout > 0, so recompute must replay the same RNG) with per-layer checkpointing."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=LAYERS), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial everywhere, norms included
            p.normal_(0.0, 0.05)
    quantize_model(model)
    apply_lora(model, "all-linear", 4, 8.0, 0.1)
    with torch.no_grad():
        for p in lora_parameters(model):  # B starts at zero: make every adapter gradient non-trivial
            p.normal_(0.0, 0.05)
    model.to(device)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def _ids(seed=1, device="cpu"):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed)).to(device)


def _grads(model, micro_batches=(1,)):
    torch.manual_seed(5)  # dropout masks: identical draws in every variant
    for seed in micro_batches:
        ids = _ids(seed, next(model.parameters()).device)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids)[0]
            loss, n = causal_lm_loss(hidden, model.lm_head.weight, ids, None)
        (loss / n).backward()
    return [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("copy_on_cpu", [False, True], ids=["noop-move", "real-copy"])
def test_offload_gives_bitwise_equal_gradients(copy_on_cpu):
    ref = _grads(_model(), micro_batches=(1, 2))
    model = _model()
    off = offload_checkpointed_inputs(model, ActivationOffloader(copy_on_cpu=copy_on_cpu))
    got = _grads(model, micro_batches=(1, 2))
    assert len(ref) == LAYERS * 7 * 2 and all(r.abs().sum() > 0 for r in ref)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    s = off.stats
    assert s.packed == s.unpacked == 2 * LAYERS  # two micro-batches, one input per layer each
    if copy_on_cpu:  # every input went to its own host copy and came back through a prefetch but the last layer's
        assert s.offloaded == 2 * LAYERS and s.kept == 0 and s.prefetched == 2 * (LAYERS - 1)
        assert s.offloaded_bytes == 2 * LAYERS * B * S * H * 2
    else:  # on the CPU the move is a no-op: nothing copied
        assert s.kept == 2 * LAYERS and s.offloaded == 0 and s.prefetched == 0


def test_exactly_the_checkpointed_layer_inputs_are_routed_through_the_offloader():
    model = _model()
    layer_inputs = []
    for layer in model.model.layers:  # module pre-hooks run outside the checkpoint: they see the layer's input
        layer.register_forward_pre_hook(lambda m, args: layer_inputs.append(args[0]))
    packed = []
    off = offload_checkpointed_inputs(model, ActivationOffloader(copy_on_cpu=True, on_pack=packed.append))
    torch.manual_seed(5)
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = causal_lm_loss(model.model(input_ids=ids)[0], model.lm_head.weight, ids, None)
    assert len(packed) == LAYERS and off.stats.unpacked == 0
    for p, x in zip(packed, layer_inputs):
        assert p.shape == (B, S, H) and p.dtype == torch.bfloat16
        assert p.data_ptr() == x.data_ptr()  # the layer input itself, not a copy or a neighbour
    loss.backward()
    # The recompute in backward saved its activations through the checkpoint's own hooks, not ours.
    assert off.stats.packed == LAYERS and off.stats.unpacked == LAYERS


def test_unpack_returns_each_layer_its_own_input_in_backward_order():
    off = ActivationOffloader(copy_on_cpu=True)
    xs = [torch.full((2, 3), float(i), requires_grad=True) for i in range(4)]
    handles = [off._pack(x) for x in xs]
    outs = [off._unpack(h) for h in reversed(handles)]  # backward order: last layer first
    assert [float(o[0, 0]) for o in outs] == [3.0, 2.0, 1.0, 0.0]
    assert all(o.data_ptr() != x.data_ptr() for o, x in zip(outs, reversed(xs)))  # real copies
    assert off.stats.prefetched == 3  # all but the first unpack were copied back ahead of time
    assert float(off._unpack(handles[2])[0, 0]) == 2.0  # a second unpack (retain_graph) still works


def test_wiring_via_enable_checkpointing_and_idempotent_wrap():
    model = _model(checkpointing=False)
    assert enable_checkpointing(model) is None and offloader_of(model) is None
    off = enable_checkpointing(model, offload_activations=True)
    assert isinstance(off, ActivationOffloader) and offloader_of(model) is off
    second = offload_checkpointed_inputs(model)  # replaces, does not stack a second pair of hooks
    assert offloader_of(model) is second
    _grads(model)
    assert second.stats.packed == LAYERS and off.stats.packed == 0


def test_offload_without_checkpointing_is_a_clear_error():
    with pytest.raises(InputError, match="gradient checkpointing"):
        offload_checkpointed_inputs(_model(checkpointing=False))
    with pytest.raises(InputError, match="offload_activations"):
        recipe_from_dict({"gradient_checkpointing": False, "offload_activations": True})
    assert recipe_from_dict({"offload_activations": True}).offload_activations is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_matches_and_frees_device_memory():
    ref = _grads(_model("cuda"), micro_batches=(1, 2))
    model = _model("cuda")
    off = offload_checkpointed_inputs(model)
    got = _grads(model, micro_batches=(1, 2))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)  # same kernels, but some CUDA backward kernels may use atomics
    assert off.stats.offloaded == 2 * LAYERS and off.stats.prefetched == 2 * (LAYERS - 1)

    # Device memory held between forward and backward: the offloaded inputs are gone from it.
    def held_after_forward(offload: bool, seq: int = 4096) -> int:
        m = _model("cuda")
        if offload:
            offload_checkpointed_inputs(m)
        ids = torch.randint(0, 256, (1, seq), device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = m.model(input_ids=ids)[0]
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - hidden.nbytes
        hidden.sum().backward()
        return held

    layer_input = 4096 * H * 2
    assert held_after_forward(False) - held_after_forward(True) >= (LAYERS - 1) * layer_input
