"""The planner: largest fitting micro-batch/rank/sequence, and what to change when nothing fits."""

import pytest
from arch_configs import ARCHS

import memory
from memory.gpus import GPU
from quant.errors import InputError


@pytest.fixture(scope="module")
def spec():
    return memory.spec_from_config(ARCHS["llama"], "llama")


def _gpu_between(fits: int, too_big: int, margin: float = 0.05) -> GPU:
    """A budget whose usable part lies strictly between two predicted totals."""
    total = int((fits + too_big) / 2 / (1 - margin))
    return GPU("test", total, "test")


def test_picks_the_largest_micro_batch_that_fits(spec):
    tot = {b: memory.estimate(spec, seq_len=256, micro_batch_size=b).device_total_bytes for b in (3, 4)}
    gpu = _gpu_between(tot[3], tot[4])
    p = memory.plan(gpu, spec, seq_len=256, micro_batch_size="auto", effective_batch_size=12)
    assert p.fits and p.micro_batch_size == 3 and p.gradient_accumulation_steps == 4
    assert p.peak_bytes == tot[3] <= p.usable_bytes
    # with an effective batch of 16 the micro-batch is lowered to a divisor: 2 x 8
    p16 = memory.plan(gpu, spec, seq_len=256, micro_batch_size="auto", effective_batch_size=16)
    assert (p16.micro_batch_size, p16.gradient_accumulation_steps, p16.max_micro_batch_size) == (2, 8, 3)


def test_rank_auto_picks_the_largest_fitting_rank(spec):
    tot = {r: memory.estimate(spec, seq_len=512, rank=r, micro_batch_size=1).device_total_bytes for r in (32, 64)}
    p = memory.plan(_gpu_between(tot[32], tot[64]), spec, seq_len=512, rank="auto", micro_batch_size=1)
    assert p.fits and p.rank == 32


def test_seq_len_auto_picks_the_longest_fitting_multiple_of_256(spec):
    tot = {s: memory.estimate(spec, seq_len=s, micro_batch_size=1).device_total_bytes for s in (768, 1024)}
    p = memory.plan(_gpu_between(tot[768], tot[1024]), spec, seq_len="auto", micro_batch_size=1)
    assert p.fits and p.seq_len == 768


def test_nothing_fits_lists_changes_that_do_with_their_peaks(spec):
    want = dict(seq_len=2048, micro_batch_size=2, rank=64, optimizer="adamw", adapter_dtype="float32", loss="hf",
                tiled_mlp=False, tiled_norms=False)  # auto would tile the norms here: they save memory even at 2k
    need = memory.estimate(spec, **want).device_total_bytes
    gpu = GPU("small", int((need - 2**20) / 0.95), "small")  # usable is 1 MiB short
    p = memory.plan(gpu, spec, effective_batch_size=2, **want)
    assert not p.fits and p.suggestions
    assert all(s.fits and s.footprint.device_total_bytes <= p.usable_bytes for s in p.suggestions if s.gpu is None)
    changes = " | ".join(s.change for s in p.suggestions)
    assert "8-bit" in changes and "loss=chunked" in changes and "norms in tiles" in changes
    bigger = [s for s in p.suggestions if s.gpu]
    assert bigger and memory.parse_gpu(bigger[0].gpu).total_bytes * 0.95 >= need


def test_sweep_is_the_cartesian_product_in_order(spec):
    rows = memory.sweep(spec, seq_lens=[64, 128], micro_batch_sizes=[1, 2], ranks=[8], device="cpu")
    assert [(r.seq_len, r.micro_batch_size) for r in rows] == [(64, 1), (64, 2), (128, 1), (128, 2)]
    assert rows[0].tensor_peak_bytes < rows[3].tensor_peak_bytes


@pytest.mark.parametrize(
    "kw, match",
    [(dict(seq_len=0), "seq_len"), (dict(micro_batch_size=0), "micro_batch_size"), (dict(rank=-4), "rank"),
     (dict(margin=0.7), "margin"), (dict(effective_batch_size=0), "effective_batch_size"),
     (dict(seq_len="long"), "seq_len")],
)
def test_bad_plan_settings(spec, kw, match):
    with pytest.raises(InputError, match=match):
        memory.plan("24GB", spec, **kw)


def test_one_settings_object_or_keyword_changes_give_the_same_footprint(spec):
    s = memory.Settings(seq_len=128, micro_batch_size=2, rank=8, loss="hf", device="cpu")
    same = memory.estimate(spec, seq_len=128, micro_batch_size=2, rank=8, loss="hf", device="cpu")
    assert memory.estimate(spec, s) == same
    assert memory.estimate(spec, s, rank=32) == memory.estimate(spec, s.changed(rank=32))
    assert memory.estimate(spec, s, rank=32).rank == 32 and s.rank == 8  # frozen: changes make a copy
    with pytest.raises(AttributeError):
        s.rank = 4
    assert hash(s) == hash(memory.Settings(seq_len=128, micro_batch_size=2, rank=8, loss="hf", device="cpu"))
    with pytest.raises(TypeError):
        memory.Settings(128)  # keyword-only


def test_a_plans_resolved_settings_reproduce_its_footprint(spec):
    p = memory.plan("2GB", spec, seq_len="auto", rank="auto", attn="auto")
    s = p.settings
    assert (s.seq_len, s.micro_batch_size, s.rank, s.attn) == (p.seq_len, p.micro_batch_size, p.rank, p.footprint.attn)
    assert s.effective_batch_size == p.effective_batch_size and "auto" not in (s.seq_len, s.micro_batch_size, s.rank)
    assert memory.estimate(spec, s) == p.footprint
    assert memory.plan("2GB", spec, s).footprint == p.footprint  # planning resolved settings changes nothing


def test_sweep_starts_from_given_settings(spec):
    base = memory.Settings(seq_len=64, loss="hf", device="cpu")
    rows = memory.sweep(spec, base, ranks=[8, 16])
    assert [(r.seq_len, r.rank, r.loss) for r in rows] == [(64, 8, "hf"), (64, 16, "hf")]
    assert rows[1] == memory.estimate(spec, base, rank=16)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda spec: memory.estimate(spec, seqlen=512), r"Unknown setting 'seqlen'.*Did you mean 'seq_len'"),
        (lambda spec: memory.plan("24GB", spec, ranks=8), r"Unknown setting 'ranks'.*Did you mean 'rank'"),
        (lambda spec: memory.estimate(spec, 4096), "memory.Settings"),
        (lambda spec: memory.estimate(spec, seq_len="auto"), r"needs a number for seq_len.*memory\.plan"),
        (lambda spec: memory.estimate(spec, optimizer="adamw8bit"), r"Did you mean 'adamw_8bit'"),
        (lambda spec: memory.Settings(dora="yes"), "dora"),
        (lambda spec: memory.Settings(targets=[]), "LoRA targets"),
        (lambda spec: memory.Settings(blocksize=100), "100"),
        (lambda spec: memory.Settings(device="tpu"), "device"),
    ],
)
def test_bad_settings_are_one_clear_error(spec, call, match):
    with pytest.raises(InputError, match=match):
        call(spec)


def test_tiling_auto_is_off_when_the_plan_fits_without_it():
    p = memory.plan("24GB", "llama-3.1-8b", seq_len=2048, micro_batch_size=1)
    assert p.fits and p.settings.tiled_mlp is False and p.settings.tiled_norms is False
    assert p.footprint.tile_tokens is None and not (p.footprint.tiled_mlp or p.footprint.tiled_norms)


def test_tiling_auto_takes_llama_8b_to_its_131072_positions_on_24gb():
    kw = dict(seq_len="auto", micro_batch_size=1, rank=32, offload_activations=True)
    off = memory.plan("24GB", "llama-3.1-8b", tiled_mlp=False, tiled_norms=False, **kw)
    mlp = memory.plan("24GB", "llama-3.1-8b", tiled_mlp="auto", tiled_norms=False, **kw)
    on = memory.plan("24GB", "llama-3.1-8b", **kw)  # both auto
    assert on.fits and on.settings.tiled_mlp is True and on.settings.tiled_norms is True
    assert on.footprint.tile_tokens == 4096 and on.footprint.tiled_norms
    assert mlp.settings.tiled_mlp is True and mlp.settings.tiled_norms is False
    # each lever pays: 63k untiled, 100k with the MLP tiled, the model's whole range with the norms too
    assert on.seq_len == 131_072 > 100_000 <= mlp.seq_len < 110_000 and 60_000 < off.seq_len < 64_000
    assert any(n.startswith("tiled MLP and norms auto: on") and str(off.seq_len) in n for n in on.notes)
    # the cap is the model's positions, not memory: the note says how far memory alone goes
    beyond = [n for n in on.notes if "max_position_embeddings" in n]
    assert beyond and int(beyond[0].split("would fit ")[1].split()[0]) > 131_072
    # smaller tiles, smaller peak: the tile length is a variable of the one tiled profile
    big = memory.estimate("llama-3.1-8b", seq_len=mlp.seq_len, rank=32, offload_activations=True, tiled_mlp=True,
                          tiled_norms=False, tile_tokens=65536)
    assert big.tensor_peak_bytes > mlp.footprint.tensor_peak_bytes


def test_tiled_norms_auto_follows_an_explicit_tiled_mlp():
    kw = dict(micro_batch_size=1, rank=32, offload_activations=True, tiled_mlp=True)
    assert memory.plan("24GB", "llama-3.1-8b", seq_len=2048, **kw).settings.tiled_norms is False  # fits without
    long = memory.plan("24GB", "llama-3.1-8b", seq_len=120_000, **kw)
    assert long.fits and long.settings.tiled_norms is True
    assert any(n.startswith("tiled norms auto: on") and "fits only with it" in n for n in long.notes)


@pytest.mark.parametrize("lever", ["tiled_mlp", "tiled_norms"])
def test_each_tiling_lever_is_suggested_when_off_and_it_would_fit(lever):
    other = {"tiled_mlp": "tiled_norms", "tiled_norms": "tiled_mlp"}[lever]
    seq = {"tiled_mlp": 90_000, "tiled_norms": 66_000}[lever]  # past 63k untiled; alone, norms reach 69k, MLP 100k
    p = memory.plan("24GB", "llama-3.1-8b", seq_len=seq, micro_batch_size=1, rank=32, offload_activations=True,
                    **{lever: False, other: False})
    assert not p.fits
    tiled = [s for s in p.suggestions if s.settings == {lever: True}]
    flag = "--" + lever.replace("_", "-")
    assert tiled and tiled[0].fits and f"{flag} on" in tiled[0].change


@pytest.mark.parametrize("bad", ["yes", 1, None])
@pytest.mark.parametrize("name", ["tiled_mlp", "tiled_norms"])
def test_bad_tiling_value(name, bad):
    with pytest.raises(InputError, match=f"{name} must be True, False or 'auto'"):
        memory.Settings(**{name: bad})


def test_a_micro_batch_larger_than_the_effective_batch_is_refused(spec):
    with pytest.raises(InputError, match=r"micro_batch_size 32 \(--batch-size\) is larger than effective_batch_"
                                         r"size 16 \(--effective-batch\).*16 or less"):
        memory.plan("24GB", spec, seq_len=256, micro_batch_size=32, effective_batch_size=16)
    with pytest.raises(InputError, match=r"16 \(--effective-batch\) \(8 on each of 2 GPUs\).*8 or less"):
        memory.plan("24GB", spec, seq_len=256, micro_batch_size=9, effective_batch_size=16, gpus=2, strategy="ddp")
    assert memory.plan("24GB", spec, seq_len=256, micro_batch_size=16, effective_batch_size=16).fits  # equal is fine


def test_a_micro_batch_that_does_not_divide_the_effective_batch_says_how_it_is_rounded(spec):
    p = memory.plan("24GB", spec, seq_len=256, micro_batch_size=3, effective_batch_size=16)
    assert (p.micro_batch_size, p.gradient_accumulation_steps, p.effective_batch_size) == (3, 6, 18)
    note = next(n for n in p.notes if n.startswith("effective batch 16 runs as 18"))
    assert "rounded up" in note and "never takes fewer sequences" in note and "1, 2, 4, 8, 16 divides" in note
    exact = memory.plan("24GB", spec, seq_len=256, micro_batch_size=4, effective_batch_size=16)
    assert not any(n.startswith("effective batch") for n in exact.notes)


def test_a_sequence_past_the_models_context_is_warned_and_never_suggested():
    p = memory.plan("24GB", "llama-3.1-8b", seq_len=200_000, micro_batch_size=1)
    assert any("--seq-len 200000 is past the model's context of 131072 positions" in n for n in p.notes)
    assert not p.fits  # the bug: "use a shorter sequence (--seq-len 139008)", past the context
    shorter = [s for s in p.suggestions if "seq_len" in s.settings]
    assert shorter and all(s.settings["seq_len"] <= 131072 for s in shorter)
    inside = memory.plan("24GB", "llama-3.1-8b", seq_len=4096, micro_batch_size=1)
    assert not any("past the model's context" in n for n in inside.notes)


def test_a_rank_beyond_the_smallest_adapted_layer_is_said(spec):
    # ARCHS llama: hidden 128, 2 of 4 heads for k/v -> k_proj and v_proj are 128 -> 64
    p = memory.plan("24GB", spec, seq_len=256, micro_batch_size=1, rank=100)
    note = next(n for n in p.notes if n.startswith("rank 100 is larger"))
    assert "self_attn.k_proj: 64 features" in note and "cannot have rank above 64" in note
    assert not any(n.startswith("rank 64 is larger") for n in memory.plan("24GB", spec, seq_len=256, rank=64).notes)
    mlp = memory.plan("24GB", spec, seq_len=256, micro_batch_size=1, rank=100, targets="mlp")  # 128 <-> 344
    assert not any("is larger than the smallest adapted layer" in n for n in mlp.notes)


def test_packed_rows_suggest_one_example_per_row_when_the_mask_is_what_does_not_fit(spec):
    same = dict(seq_len=1024, micro_batch_size=4, tiled_mlp=False, tiled_norms=False)  # profiles fitted above
    packed = memory.estimate(spec, packed=True, **same).device_total_bytes
    plain = memory.estimate(spec, **same).device_total_bytes
    p = memory.plan(_gpu_between(plain, packed), spec, packed=True, effective_batch_size=4, **same)
    assert not p.fits
    off = next(s for s in p.suggestions if s.settings == {"packed": False})
    assert off.fits and "data.packing: false" in off.change


def test_gpus_auto_stops_where_more_gpus_would_split_the_batch_below_the_micro_batch():
    p = memory.plan("4GB", "llama-3.1-8b", seq_len=2048, micro_batch_size=4, effective_batch_size=8, gpus="auto")
    assert not p.fits and p.settings.gpus == 1  # the first plan is reported, with what would fit
    assert any(n.startswith("gpus auto: 1 to 2 GPUs do not fit, and 3 or more would give each GPU less than "
                            "micro-batch 4") for n in p.notes)
