"""Host memory: what the planner puts in RAM, and a plan that fits the GPU but not the machine."""

import importlib
import json

import pytest

import memory
from memory import host
from qlora.cli import main
from quant.errors import InputError

GIB = 1 << 30
plan_module = importlib.import_module("memory.plan")  # the module (memory.plan is the function)


def test_host_terms_follow_the_settings():
    spec = memory.load_spec("llama-3.1-8b")
    off = memory.estimate(spec, seq_len=100_000)
    on = memory.estimate(spec, seq_len=100_000, offload_activations=True)
    per_layer = 2 * 100_000 * spec.hidden_size
    assert on.host.pinned_offload == spec.num_layers * per_layer  # every layer's input waits in pinned memory
    assert off.host.pinned_offload == 0
    assert on.host.paged_optimizer_state == off.host.paged_optimizer_state > 0  # paged 8-bit AdamW
    assert memory.estimate(spec, optimizer="adamw_8bit").host.paged_optimizer_state == 0
    # the loader streams: two copies of the largest tensor (Llama-3.1-8B's 128256 x 4096 embedding), not the model
    assert on.host.loader_peak == 2 * 2 * 128256 * 4096
    assert on.host.total_bytes == on.host.process + on.host.pinned_offload + on.host.paged_optimizer_state
    assert off.host.total_bytes == off.host.process + off.host.loader_peak  # loading is the larger moment here
    cpu = memory.estimate("smollm2-135m", device="cpu")
    assert cpu.host.device_tensors == cpu.tensor_peak_bytes and cpu.host.process == host.PROCESS_BYTES["cpu"]


def test_a_plan_that_fits_the_gpu_but_not_the_ram_says_so_and_suggests():
    settings = memory.Settings(seq_len=60_000, offload_activations=True, micro_batch_size=1)
    roomy = memory.plan("24GB", "llama-3.1-8b", settings, ram="64GB")
    assert roomy.fits and roomy.host_fits and roomy.host_budget_bytes == 64 * GIB
    tight = memory.plan("24GB", "llama-3.1-8b", settings, ram="16GB")
    assert tight.footprint.device_total_bytes <= tight.usable_bytes  # the GPU side fits...
    assert tight.host_fits is False and not tight.fits  # ...the machine does not
    assert any("does NOT fit in 15.20 GiB usable of 16.00 GiB RAM" in n for n in tight.notes)
    changes = [s.change for s in tight.suggestions]
    assert any("shorter sequence" in c for c in changes)
    assert any("machine with at least" in c for c in changes)
    for s in tight.suggestions:
        if "shorter sequence" in s.change:
            assert s.footprint.host.total_bytes <= 16 * GIB * 0.95
    assert memory.plan("24GB", "llama-3.1-8b", settings).host_fits is None  # not checked unless asked


def test_auto_ram_is_this_machines_available_memory(monkeypatch):
    monkeypatch.setattr(plan_module, "available_ram", lambda: 8 * GIB)
    p = memory.plan("24GB", "llama-3.1-8b", seq_len=60_000, offload_activations=True, ram="auto")
    assert p.host_budget_bytes == 8 * GIB and p.host_fits is False


@pytest.mark.parametrize("bad", ["0GB", "-4GB", "lots", "16", 0, -1])
def test_bad_ram_values(bad):
    with pytest.raises(InputError, match="ram|--ram"):
        memory.plan("24GB", "llama-3.1-8b", ram=bad)


def test_cli_prints_host_beside_device_and_fails_on_a_host_shortfall(capsys):
    args = ["plan", "--gpu", "24GB", "--seq-len", "60000", "--offload-activations", "--batch-size", "1"]
    assert main(args + ["--ram", "16GB"]) == 1
    out = capsys.readouterr().out
    assert "device total" in out and "host total" in out and "does not fit" in out
    assert main(args + ["--ram", "64GB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["host"]["fits"] is True and d["host"]["budget_bytes"] == 64 * GIB
    assert d["host"]["pinned_offload_bytes"] > 10 * GIB
    assert main(args + ["--ram", "sixteen"]) == 2
    assert "--ram 'sixteen' is not a size" in capsys.readouterr().err
