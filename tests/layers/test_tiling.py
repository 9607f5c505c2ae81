"""Tiled MLPs and norms give the untiled modules' outputs and gradients (float32: to 1e-6 / 1e-5 relative)."""

import pytest
import torch

from layers.tiling import decoder_mlps, norms, tile_mlps, tile_norms
from qlora.lora.surgery import apply_lora
from quant import InputError, quantize_model
from tests.qlora.lora_helpers import batch, randomize_adapters, tiny_model


def _model(arch="llama", nf4=False, dropout=0.0, dora=False):
    model = tiny_model(arch, dtype=torch.float32)
    if nf4:
        quantize_model(model, "nf4", 64, True, torch.float32)
    apply_lora(model, "all-linear", rank=4, alpha=8.0, dropout=dropout, use_dora=dora, dtype=torch.float32)
    randomize_adapters(model)
    return model


def _step(model, ids, seed=0, autocast=False):
    """Loss and every trainable parameter's gradient (in parameter order); ``autocast``: a bf16 forward,
    and the backward outside it, as the trainer runs them."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch, nf4, dora", [("llama", False, False), ("llama", True, False), ("phi3", False, False),
                                             ("gemma", True, True)])
def test_tiled_equals_untiled(arch, nf4, dora):
    model = _model(arch, nf4, dora=dora).train()
    ids = batch(n=2, t=12)  # 24 tokens: tiles of 5 leave a short last one
    logits, grads = _step(model, ids)
    handles = tile_mlps(model, 5)
    tiled_logits, tiled_grads = _step(model, ids)
    torch.testing.assert_close(tiled_logits, logits, rtol=1e-6, atol=1e-6)
    assert len(tiled_grads) == len(grads) > 0
    for a, b in zip(tiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for h in handles:
        h.remove()
    assert all("forward" not in m.__dict__ for m in decoder_mlps(model))
    torch.testing.assert_close(_step(model, ids)[0], logits, rtol=0, atol=0)  # removed: the untiled path again


def test_state_dict_and_inference_unchanged():
    model = _model().eval()
    ids = batch(n=2, t=12)
    keys = list(model.state_dict())
    with torch.no_grad():
        want = model(input_ids=ids).logits
        tile_mlps(model, 7)
        got = model(input_ids=ids).logits
    assert list(model.state_dict()) == keys  # adapter files and checkpoints see the same names
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lora_dropout_draws_the_same_masks_in_the_recompute():
    """Tiled forward and its backward recompute must agree: the gradient is the one of the function computed.

    The reference runs the same tiles with plain autograd (each tile's graph kept), from the same seed:
    without the random state replayed in backward, dropout would draw new masks there and the gradients
    would differ by far more than the tolerance."""
    model = _model(dropout=0.3).train()
    ids = batch(n=2, t=12)
    mlps = decoder_mlps(model)
    originals = [m.forward for m in mlps]

    def kept_tiles(forward):
        def run(x):
            flat = x.reshape(-1, x.shape[-1])
            return torch.cat([forward(flat[i:i + 5]) for i in range(0, flat.shape[0], 5)]).reshape(x.shape)
        return run

    for m, f in zip(mlps, originals):
        m.forward = kept_tiles(f)
    want_logits, want = _step(model, ids, seed=3)
    for m in mlps:
        del m.forward
    tile_mlps(model, 5)
    got_logits, got = _step(model, ids, seed=3)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_with_checkpointing_and_autocast_the_recompute_runs_under_autocast():
    model = _model(nf4=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(n=2, t=12)
    logits, grads = _step(model, ids, autocast=True)
    seen = []
    down = decoder_mlps(model)[0].down_proj
    down.register_forward_hook(lambda *_: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    tile_mlps(model, 8)
    tiled_logits, tiled_grads = _step(model, ids, autocast=True)
    # forward, checkpoint recompute (both without a graph), then the tiles' recompute in backward: under autocast
    assert (True, True) in seen and {autocast for _, autocast in seen} == {True}
    torch.testing.assert_close(tiled_logits, logits, rtol=2e-2, atol=2e-2)
    for a, b in zip(tiled_grads, grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6  # bf16 rounding apart, not a different gradient


def test_bad_tile_size_and_a_model_without_mlps_are_refused():
    model = _model()
    for bad in (0, -4, 2.5, True):
        with pytest.raises(InputError, match="positive number of tokens"):
            tile_mlps(model, bad)
    with pytest.raises(InputError, match="no decoder layers with an 'mlp'"):
        tile_mlps(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)


@pytest.mark.parametrize("arch, nf4", [("llama", False), ("qwen3", True), ("gemma", True), ("phi3", False)])
def test_tiled_norms_equal_untiled(arch, nf4):
    model = _model(arch, nf4).train()
    ids = batch(n=2, t=12)
    logits, grads = _step(model, ids)
    handles = tile_norms(model, 5) + tile_mlps(model, 7)  # both levers at once, tiles of different sizes
    tiled_logits, tiled_grads = _step(model, ids)
    torch.testing.assert_close(tiled_logits, logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(tiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for h in handles:
        h.remove()
    torch.testing.assert_close(_step(model, ids)[0], logits, rtol=0, atol=0)


def test_norms_found_by_type_per_layer_per_head_and_final():
    found = norms(_model("qwen3"))
    # 2 layers x (input, post-attention, q_norm, k_norm) + the final norm
    assert len(found) == 9 and {type(m).__name__ for m in found} == {"Qwen3RMSNorm"}
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4), torch.nn.LayerNorm(4))
    assert [type(m) for m in norms(plain)] == [torch.nn.RMSNorm, torch.nn.LayerNorm]


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct storages autograd keeps for ``module(x)``'s backward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_a_tiled_norm_keeps_only_its_bf16_input_for_backward():
    """What the lever is for: transformers' RMSNorm keeps a float32 copy of its input (4 bytes per value) for
    backward; tiled, only the bf16 input (2 bytes per value) is kept, and the gradient is the same."""
    norm = norms(tiny_model("llama", dtype=torch.bfloat16))[0].requires_grad_(False)  # frozen, as in QLoRA
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    assert _saved_bytes(norm, x) >= x.numel() * 4
    want = torch.autograd.grad(norm(x).float().square().sum(), x)[0]
    tile_norms(torch.nn.Sequential(norm), 32)
    assert _saved_bytes(norm, x) == x.numel() * 2
    got = torch.autograd.grad(norm(x).float().square().sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same per-row ops on the same rows: bit-equal


def test_a_model_without_norms_is_refused():
    with pytest.raises(InputError, match="no RMSNorm or LayerNorm"):
        tile_norms(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
