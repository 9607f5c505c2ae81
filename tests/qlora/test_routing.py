"""Several adapters in one batch: routed rows equal each adapter alone; generation and the CLI batch across them."""

import pytest
import torch
from lora_helpers import batch, randomize_adapters, tiny_model
from transformers import AutoTokenizer

from layers import DoRALinear, LoRALinear, RoutedLinear
from qlora.adapters.files import save_adapter
from qlora.adapters.merging import merge, unmerge
from qlora.adapters.multi import active_adapter, add_adapter, disable_adapters, set_active_adapter
from qlora.adapters.routing import route_adapters
from qlora.builtin_models import resolve_model_dir
from qlora.generation import generate, generate_batches, prompt_ids
from qlora.lora.surgery import apply_lora, lora_modules
from quant import InputError, quantize_model
from quant.loading import load_quantized_model

ROWS = ["lora", "rs", None, "dora", "lora", "dora"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three adapters for one tiny Llama: LoRA r4 on attention, rsLoRA r2 on q/down, DoRA r3 on the MLP."""
    root = tmp_path_factory.mktemp("routing")
    for name, kw, seed in (("lora", dict(targets="attention", rank=4, alpha=8.0), 11),
                           ("rs", dict(targets=["q_proj", "down_proj"], rank=2, alpha=4.0, use_rslora=True), 12),
                           ("dora", dict(targets="mlp", rank=3, alpha=6.0, use_dora=True), 13)):
        m = tiny_model("llama")
        apply_lora(m, dtype=torch.float32, **kw)
        randomize_adapters(m, seed=seed, std_b=0.2)
        save_adapter(m, root / name)
    return root


def _nf4(compute_dtype):
    return quantize_model(tiny_model("llama", dtype=compute_dtype), compute_dtype=compute_dtype)


def _served(files, compute_dtype, dtype):
    model = _nf4(compute_dtype)
    for name in ("lora", "rs", "dora"):
        add_adapter(model, name, files / name, dtype=dtype)
    return model


@torch.no_grad()
def _alone(files, compute_dtype, dtype, x):
    """Per row of ``ROWS``: the logits of that row with its adapter alone (or none), on an equal NF4 base."""
    model = _served(files, compute_dtype, dtype)
    out = {}
    for name in set(ROWS):
        if name is None:
            with disable_adapters(model):
                out[None] = model(input_ids=x).logits.float()
        else:
            set_active_adapter(model, name)
            out[name] = model(input_ids=x).logits.float()
    return torch.stack([out[name][i] for i, name in enumerate(ROWS)])


@pytest.mark.parametrize("compute_dtype, dtype, tol", [(torch.float32, "float32", 2e-5),
                                                       (torch.bfloat16, "bfloat16", 0.03)])
def test_routed_rows_equal_each_adapter_alone(files, compute_dtype, dtype, tol):
    x = batch(n=len(ROWS))
    ref = _alone(files, compute_dtype, dtype, x)
    model = _served(files, compute_dtype, dtype)
    set_active_adapter(model, "rs")
    before = {name: m for name, m in lora_modules(model)}
    with torch.no_grad(), route_adapters(model) as router:
        assert router.names == ["lora", "rs", "dora"]
        routed = [m for m in model.modules() if isinstance(m, RoutedLinear)]
        assert len(routed) == len(before) == 14  # 2 layers x (4 attention + 3 MLP), the union of the targets
        router.set_rows(ROWS)
        got = model(input_ids=x).logits.float()
        # the adapters differ from each other and from the base by far more than the tolerance
        scale = ref.abs().max().item()
        for row in (0, 1, 3):  # each adapter moves its row by far more than the tolerance
            assert (ref[row] - ref[2]).abs().max() > 10 * tol * scale
        torch.testing.assert_close(got, ref, atol=tol * scale, rtol=0)
        router.set_rows(["dora"] * len(ROWS))  # a new route for the next batch
        again = model(input_ids=x).logits.float()
        torch.testing.assert_close(again[[3, 5]], ref[[3, 5]], atol=tol * ref.abs().max().item(), rtol=0)
    assert {name: m for name, m in lora_modules(model)} == before  # the layers of entry are back, untouched


def test_a_batch_of_one_adapter_equals_it_alone_exactly_in_float32(files):
    x = batch(n=3)
    model = _served(files, torch.float32, "float32")
    set_active_adapter(model, "dora")
    with torch.no_grad():
        alone = model(input_ids=x).logits
        with route_adapters(model, ["dora", "lora"]) as router:
            router.set_rows(["dora"] * 3)
            routed = model(input_ids=x).logits
            router.set_rows([None, None, None])
            no_adapter = model(input_ids=x).logits
        with disable_adapters(model):
            base = model(input_ids=x).logits
    torch.testing.assert_close(routed, alone, atol=2e-5, rtol=0)
    assert torch.equal(no_adapter, base)  # rows with no adapter skip the update: exactly the base


def test_routed_layer_pads_ranks_and_refuses_what_it_cannot_serve():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    a, b = LoRALinear(base, rank=2, alpha=4.0), DoRALinear(base, rank=5, alpha=5.0)
    for m in (a, b):
        torch.nn.init.normal_(m.lora_B.weight)
    layer = RoutedLinear(base, [a, None, b])
    assert layer.slots == 3 and layer.a_stack.shape == (4, 5, 8) and layer.b_stack.shape == (4, 6, 5)
    x = torch.randn(4, 3, 8)
    layer.set_route(torch.tensor([1, 2, 3, 0]))
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y[0], a(x[0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(y[1], base(x[1]), atol=0, rtol=0)  # slot 2 covers no layer here
        torch.testing.assert_close(y[2], b(x[2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(y[3], base(x[3]), atol=0, rtol=0)
    with pytest.raises(InputError, match=r"slots must be in 0\.\.3"):
        layer.set_route(torch.tensor([0, 4]))
    with pytest.raises(InputError, match="1-d integer tensor"):
        layer.set_route(torch.tensor([[1.0]]))
    layer.set_route(torch.tensor([1, 1]))
    with pytest.raises(InputError, match="names 2 rows but the input has 4"):
        layer(x)
    with pytest.raises(InputError, match="around another base"):
        RoutedLinear(torch.nn.Linear(8, 6), [a])
    a.merge()
    with pytest.raises(InputError, match="merged"):
        RoutedLinear(base, [a])


def test_route_adapters_bad_input(files):
    model = _nf4(torch.float32)
    with pytest.raises(InputError, match="has none"):
        with route_adapters(model):
            pass
    add_adapter(model, "lora", files / "lora")
    with pytest.raises(InputError, match="No adapter named 'sql'; loaded adapters: 'lora'"):
        with route_adapters(model, ["sql"]):
            pass
    with route_adapters(model) as router:
        with pytest.raises(InputError, match="No routed adapter named 'rs'"):
            router.set_rows(["lora", "rs"])
    merge(model)
    with pytest.raises(InputError, match="merged"):
        with route_adapters(model):
            pass
    unmerge(model)


def test_route_adapters_restores_the_model_after_an_error(files):
    model = _served(files, torch.float32, "float32")
    x = batch(n=2)
    before = dict(lora_modules(model))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with pytest.raises(RuntimeError, match="boom"), route_adapters(model):
            raise RuntimeError("boom")
        assert not any(isinstance(m, RoutedLinear) for m in model.modules())
        assert dict(lora_modules(model)) == before
        assert torch.equal(model(input_ids=x).logits, ref)


@pytest.fixture(scope="module")
def builtin_files(tmp_path_factory):
    """Three adapters for builtin:tiny-llama (NF4, float32 compute), as in ``files``: mixed ranks, targets, variants."""
    root = tmp_path_factory.mktemp("routing-builtin")
    for name, kw, seed in (("lora", dict(targets="attention", rank=4, alpha=8.0), 21),
                           ("rs", dict(targets=["q_proj", "down_proj"], rank=2, alpha=4.0, use_rslora=True), 22),
                           ("dora", dict(targets="mlp", rank=3, alpha=6.0, use_dora=True), 23)):
        m = load_quantized_model(resolve_model_dir("builtin:tiny-llama"), "cpu", compute_dtype=torch.float32,
                                 dtype=torch.float32)
        apply_lora(m, dtype=torch.float32, **kw)
        randomize_adapters(m, seed=seed, std_b=0.5)
        save_adapter(m, root / name)
    return root


def test_generate_batches_across_adapters_as_each_alone(builtin_files):
    model_dir = resolve_model_dir("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_quantized_model(model_dir, "cpu", compute_dtype=torch.float32, dtype=torch.float32)
    for name in ("lora", "rs", "dora"):
        add_adapter(model, name, builtin_files / name)
    set_active_adapter(model, "rs")
    texts = ["What is two plus two?", "Name a city.", "Hi"] * 2
    ids = [prompt_ids(tok, t) for t in texts]
    kw = dict(max_new_tokens=8)
    batched = generate(model, tok, ids, adapters=ROWS, batch_size=6, **kw)
    alone = [generate(model, tok, [i], adapters=[a], **kw)[0] for i, a in zip(ids, ROWS)]
    assert batched == alone
    assert active_adapter(model) == "rs"  # a call for one adapter activates it only for the call
    # the same prompt under different adapters gets different replies: the routing is what decides them
    assert len({batched[0], batched[3]}) == 2 and len({batched[1], batched[2], batched[4]}) >= 2
    assert generate(model, tok, ids[:2], **kw) == [generate(model, tok, [i], adapters=["rs"], **kw)[0]
                                                   for i in ids[:2]]  # adapters=None: the active adapter
    got = dict(generate_batches(model, tok, ids, adapters=ROWS, batch_size=4, **kw))
    assert sorted(got) == list(range(len(ids))) and [got[i] for i in range(len(ids))] == batched
    with pytest.raises(InputError, match="got 2 names for 6 prompts"):
        generate(model, tok, ids, adapters=["lora", "rs"])
    for names in (["sql", "sql"], ["sql", "lora"]):  # one adapter for all, or routed: the same message
        with pytest.raises(InputError, match="No adapter named 'sql'; loaded adapters: 'lora', 'rs' or 'dora'"):
            generate(model, tok, ids[:2], adapters=names)
