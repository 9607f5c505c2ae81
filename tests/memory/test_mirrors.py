"""The probe's LoRA stand-in allocates exactly what qlora's real LoRA layer does.

memory cannot import qlora, so memory.mirrors repeats LoRALinear's (and
DoRA's) forward op for op. Here the probe runs once with the mirror and once
with qlora's real classes (built on meta) and the two timelines must be
identical, allocation by allocation. A change to qlora's layer that moves
memory fails this test instead of silently skewing plans.
"""

import pytest
import torch
from arch_configs import ARCHS

import memory
from memory.probe import body_run
from memory.targets import resolve_targets
from layers.dora import enable_dora
from layers.lora import LoRALinear
from qlora.lora.targets import resolve_targets as qlora_resolve

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def real_lora(base, rank, dropout, dora, dtype):
    module = LoRALinear(base, rank, 2.0 * rank, dropout, dtype=DTYPES[dtype])
    if dora:
        enable_dora(module)
    return module


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(dropout=0.1), dict(dora=True), dict(adapter_dtype="float32"), dict(checkpointing=False, dora=True, dropout=0.1)],
    ids=["plain", "dropout", "dora", "fp32", "nockpt-dora-dropout"],
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_mirror_timeline_equals_qlora_lora_timeline(settings, device):
    spec = memory.spec_from_config(ARCHS["llama"], "llama")
    targets = resolve_targets(spec, "all-linear")
    mirror = body_run(spec, 2, 16, 4, targets, device=device, **settings)
    real = body_run(spec, 2, 16, 4, targets, device=device, lora_factory=real_lora, **settings)
    assert real.markers == mirror.markers
    assert torch.equal(real.live, mirror.live)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
@pytest.mark.parametrize("preset", ["all-linear", "attention", "qv", "mlp"])
def test_target_presets_resolve_like_qlora(arch, preset):
    spec = memory.spec_from_config(ARCHS[arch], arch)
    from memory.spec import meta_model

    model = meta_model(spec.config)
    theirs = {n.split(".layers.", 1)[1].partition(".")[2] for n in qlora_resolve(model, preset)}
    assert set(resolve_targets(spec, preset)) == theirs
