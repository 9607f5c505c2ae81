"""Sliding-window attention: when transformers builds the mask, and the planner following it.

transformers builds a sliding layer's sdpa mask only from a sequence as long as
the window on (``masking_utils._ignore_causal_mask_sdpa``: ``kv_length >=
local_attention_size``); below it sdpa runs with ``is_causal`` and no mask. The
planner's dry runs use 32-160 tokens, inside any real window, so a plan at or past
the window is dry-run with a window of 4 (``memory.profile.probe_window``). These
tests pin that boundary per family, check that the window's size changes nothing
but the mask's existence, and measure one real CPU step past the window.
"""

import contextlib
import math

import pytest
import torch
from arch_configs import ARCHS, BASE
from memcheck import check

import memory
from memory import fit, profile
from memory.meta import build_config
from memory.probe import body_run
from memory.profile import PROBE_WINDOW as _PROBE_WINDOW
from memory.profile import probe_window

MISTRAL = dict(BASE, model_type="mistral", sliding_window=64)
QWEN2 = dict(BASE, model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
GEMMA3 = dict(
    BASE, model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
    sliding_window_pattern=3, hidden_activation="gelu_pytorch_tanh",
)
PHI3 = dict(ARCHS["phi3"], sliding_window=64)


def _spec(facts, name="sw"):
    return memory.spec_from_config(facts, name=name)


def _windows(facts, seqs):
    spec = _spec(facts)
    return [probe_window(spec, s) for s in seqs]


W = _PROBE_WINDOW
IN = profile._NO_WINDOW  # inside a window shorter than the probe sequences: dry-run with none at all


@pytest.mark.parametrize("facts", [MISTRAL, QWEN2, GEMMA3, PHI3], ids=["mistral", "qwen2", "gemma3", "phi3"])
def test_the_mask_regime_starts_at_the_window(facts):
    assert _windows(facts, [8, 63, 64, 65, 4096]) == [IN, IN, W, W, W]


def test_gemma2_alternating_layers_past_its_window():
    # ARCHS["gemma2"]: window 16, layers sliding/full/sliding (eager only: the mask exists at every length,
    # so the probe window changes nothing there, see below)
    assert _spec(ARCHS["gemma2"]).layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert _windows(ARCHS["gemma2"], [15, 16, 48]) == [IN, W, W]


def test_no_window_or_no_sliding_layer_means_no_sliding_mask():
    assert _windows(ARCHS["mistral"], [8, 100_000]) == [None, None]  # sliding_window: null (Mistral v0.2+)
    assert _windows(ARCHS["llama"], [100_000]) == [None]
    assert _windows(dict(QWEN2, use_sliding_window=False), [100_000]) == [None]  # Qwen2.5's configs
    # use_sliding_window with max_window_layers >= the depth: every layer is full attention
    assert _spec(dict(QWEN2, max_window_layers=3)).layer_types == ("full_attention",) * 3
    assert _windows(dict(QWEN2, max_window_layers=3), [100_000]) == [None]
    assert _windows(dict(GEMMA3, layer_types=["full_attention"] * 3), [100_000]) == [None]


def test_the_window_is_the_models_even_when_config_json_omits_it():
    # MistralConfig's default window is 4096: a config.json without the key still slides
    facts = dict(MISTRAL)
    del facts["sliding_window"]
    assert build_config(facts).sliding_window == 4096
    assert _windows(facts, [4095, 4096]) == [None, W]


@pytest.mark.parametrize(
    "name, window",
    [("mistral-7b-v0.1", 4096), ("gemma-2-2b", 4096), ("gemma-3-1b", 512), ("phi-3-mini-4k", 2047)],
)
def test_catalog_sliding_windows(name, window):
    spec = memory.load_spec(name)
    assert [probe_window(spec, s) for s in (window - 1, window, 4 * window)] == [None, W, W]


def test_catalog_models_without_a_sliding_mask():
    for name in ("mistral-7b-v0.3", "qwen2.5-7b", "qwen3-8b", "llama-3.1-8b", "phi-3.5-mini"):
        assert probe_window(memory.load_spec(name), 131072) is None, name  # phi-3.5: window 262144


def test_gemma3_catalog_entry_is_the_published_model():
    spec = memory.load_spec("google/gemma-3-1b-it")
    assert spec.name == "gemma-3-1b" and spec.lm_class == "Gemma3ForCausalLM" and spec.supports_sdpa
    assert spec.total_params == 999_885_952
    assert spec.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert memory.load_spec("mistralai/Mistral-7B-v0.1").total_params == 7_241_732_096


def test_a_plan_inside_a_window_shorter_than_the_probe_sequences():
    # Window 64 lies among the probe's sequences (32-160): a plan inside it must be dry-run with a window
    # no probe sequence reaches, or some dry runs build the mask and others not (NotPolynomial).
    spec = _spec(MISTRAL)
    inside = memory.estimate(spec, seq_len=48, micro_batch_size=2, device="cpu")
    at = memory.estimate(spec, seq_len=64, micro_batch_size=2, device="cpu")
    assert 0 < inside.tensor_peak_bytes < at.tensor_peak_bytes


# ---------------------------------------------------------------------------- what transformers does


def test_transformers_builds_the_sdpa_mask_from_the_window_on():
    # The boundary probe_window assumes, read from the installed transformers (not restated).
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = build_config(dict(MISTRAL, sliding_window=16))
    config._attn_implementation = "sdpa"

    def mask(seq):
        embeds = torch.zeros((2, seq, 8))
        return create_sliding_window_causal_mask(config, embeds, None, None, position_ids=None)

    assert mask(15) is None
    for seq in (16, 40):
        m = mask(seq)
        assert m.dtype == torch.bool and m.shape == (2, 1, seq, seq)
        assert m.untyped_storage().nbytes() == seq * seq  # one s x s bool, expanded over the batch


def test_past_the_window_only_the_masks_existence_matters():
    # Every probe window below the probe's sequences gives the same dry run: the mask's size does not
    # depend on the window. With sdpa, the run past the window has the mask's s^2 terms; with eager,
    # which builds a mask at any length, the probe window changes nothing.
    spec = _spec(MISTRAL)
    targets = ("self_attn.q_proj", "mlp.down_proj")
    smallest = min(s for _, s, _ in fit._CANDIDATES)
    assert _PROBE_WINDOW < smallest

    def run(attn, window, seq=smallest):  # a probe sequence: every probe window is below it
        return body_run(spec, 2, seq, 4, targets, attn=attn, device="cpu", window=window).live

    past = run("sdpa", 2)
    assert torch.equal(past, run("sdpa", smallest - 1))
    inside = run("sdpa", None)  # the config's window, 64: longer than the run
    assert past.sum(1).max() - inside.sum(1).max() >= 2 * smallest * smallest * 2  # at least the bf16 copy
    assert torch.equal(run("eager", None), run("eager", _PROBE_WINDOW))


# ---------------------------------------------------------------------------- a real step past the window


def test_prediction_past_the_window_within_3_percent_of_a_cpu_step():
    # Measured -0.66%; without sdpa's bf16 copy of the mask in the CPU kernel stand-in, -5.97%.
    facts = dict(MISTRAL, sliding_window=32)
    c = check(facts, name="mistral-sw32", device="cpu", batch=2, seq=256, rank=8, targets="attention")
    assert probe_window(_spec(facts, "mistral-sw32"), 256) == _PROBE_WINDOW
    m = c.measurement
    assert math.isfinite(m.loss) and m.peak_bytes > m.start_bytes > 0
    assert abs(c.error) < 0.03, f"predicted {c.predicted_bytes}, measured {m.peak_bytes} ({100 * c.error:+.2f}%)"


def test_cpu_sdpa_stand_in_allocates_what_cpu_sdpa_does_with_a_mask():
    # Past the window sdpa gets a bool mask; the CPU kernel first makes a b x 1 x s x s additive copy of it.
    import torch.nn.functional as F

    from memory.kernels import device_sdpa
    from memory.tracker import LiveTensorTracker

    def allocations(device):
        q, k, v = (torch.zeros((2, 4, 16, 32), dtype=torch.bfloat16, device=device) for _ in range(3))
        mask = torch.ones((1, 1, 16, 16), dtype=torch.bool, device=device).tril().expand(2, 1, 16, 16)
        tracker = LiveTensorTracker(device, record=True)
        with device_sdpa("cpu") if device == "meta" else contextlib.nullcontext(), tracker:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return sorted(e.nbytes for e in tracker.events if e.nbytes > 0)

    assert allocations("meta") == allocations("cpu")
    assert 2 * 16 * 16 * 2 in allocations("cpu")


def test_bench_merge_replaces_the_measured_rows_and_keeps_the_others():
    import memory_accuracy as bench

    grid = [("tiny-llama", dict(batch=2, seq=64, rank=8)), ("tiny-mistral-sw", dict(batch=2, seq=256, rank=8)),
            ("tiny-gemma3", dict(batch=2, seq=48, rank=8))]

    def row(model, settings, error):
        return dict(model=model, settings=settings, error=error, attn="sdpa", sliding_window=None)

    old = {"rows": [row("tiny-gemma3", grid[2][1], 0.01), row("tiny-llama", grid[0][1], 0.02),
                    row("tiny-llama", dict(batch=9, seq=9, rank=9), 0.5)]}  # the last is no longer in the grid
    merged = bench.merge_rows(old, grid, {2: dict(row(*grid[1], 0.03), row=2)})
    assert [(r["model"], r["error"]) for r in merged] == [("tiny-llama", 0.02), ("tiny-mistral-sw", 0.03),
                                                         ("tiny-gemma3", 0.01)]
    assert all("row" not in r for r in merged)
