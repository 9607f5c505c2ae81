"""The probe dry-runs the real adapter layers, and their timelines stay what the planner was built on.

memory.probe builds ``layers.LoRALinear`` / ``layers.DoRALinear`` -- the
classes qlora trains with -- on the meta device; there is no second copy of
their forward to drift. The recorded timelines below were taken from the
probe before that change (when it ran a hand-written mirror of the layers,
itself tested allocation for allocation against them), so a change to the
layers that moves memory fails here instead of silently skewing plans. If a
change moves memory on purpose, re-record the numbers and say why.
"""

import hashlib
import subprocess
import sys

import pytest
import torch
from arch_configs import ARCHS

import memory
from layers import AdapterLinear, DoRALinear, LoRALinear
from memory.kernels import ProbeNF4Linear
from memory.meta import meta_model
from memory.probe import TAGS, body_run, probe_layer_types, probe_model
from memory.targets import resolve_targets
from memory.tracker import LiveTensorTracker
from qlora.lora.targets import resolve_targets as qlora_resolve

SETTINGS = {
    "plain": dict(),
    "dropout": dict(dropout=0.1),
    "dora": dict(dora=True),
    "fp32": dict(adapter_dtype="float32"),
    "nockpt-dora-dropout": dict(checkpointing=False, dora=True, dropout=0.1),
}
# The tiny Llama the numbers were recorded on (arch_configs.ARCHS["llama"] then), kept here to stay tied to them.
LLAMA = dict(
    model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
)
# body_run(LLAMA, batch 2, seq 16, rank 4, all-linear): events, peak live bytes, peak bytes per tag
# (order of probe.TAGS), and the first 16 hex digits of sha256 over the whole (events, tags) int64 timeline.
RECORDED = {
    "plain-cpu": (1494, 315524, (512, 17536, 112640, 98308, 8192, 208128, 90816, 36992), "9c7d544e9f8f7008"),
    "dropout-cpu": (1634, 404420, (512, 17536, 112640, 98308, 8192, 323072, 90816, 36992), "270dbc8e35868202"),
    "dora-cpu": (2680, 560516, (512, 17536, 158048, 98308, 8192, 353920, 178880, 46592), "80efaaa07dd5e293"),
    "fp32-cpu": (1658, 432644, (512, 17536, 156672, 98308, 8192, 346368, 90816, 73984), "1327e90db1cfd4a7"),
    "nockpt-dora-dropout-cpu": (
        2144, 1009024, (512, 17536, 901248, 98308, 8192, 112144, 178880, 46592), "750b84e969595d5c"),
    "plain-cuda": (1530, 315524, (512, 17536, 112640, 98308, 8192, 208128, 90816, 36992), "fb1dcdc40e176648"),
    "dropout-cuda": (1670, 379844, (512, 17536, 112640, 98308, 8192, 287488, 90816, 36992), "dd7c99c9405b63dd"),
    "dora-cuda": (2716, 560516, (512, 17536, 158048, 98308, 8192, 353920, 178880, 46592), "9b30f4ce7dd8cf4e"),
    "fp32-cuda": (1694, 432644, (512, 17536, 156672, 98308, 8192, 346368, 90816, 73984), "12cfb4c0de3a41f9"),
    "nockpt-dora-dropout-cuda": (
        2172, 961152, (512, 17536, 842368, 98308, 8192, 112144, 178880, 46592), "6b06dad6f18d0dd4"),
}


def _llama():
    spec = memory.spec_from_config(LLAMA, "llama")
    return spec, resolve_targets(spec, "all-linear")


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("adapter_dtype", ["bfloat16", "float32"])
def test_probe_model_holds_the_real_adapter_layers(dora, adapter_dtype):
    spec, targets = _llama()
    n = len(probe_layer_types(spec))
    model = probe_model(
        spec, n, targets, 4, 0.1, dora, adapter_dtype, "sdpa", True, "cuda", "nf4", 64, True, LiveTensorTracker("meta"),
    )
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert len(adapters) == n * len(targets)
    want = DoRALinear if dora else LoRALinear
    for m in adapters:
        assert type(m) is want  # the class qlora trains with, not a stand-in
        assert isinstance(m.base_layer, ProbeNF4Linear) and m.rank == 4 and m.dropout == 0.1
        assert m.lora_A.weight.device.type == "meta" and m.lora_A.weight.dtype == getattr(torch, adapter_dtype)
        assert m.lora_A.weight.requires_grad and m.lora_B.weight.requires_grad
        if dora:
            assert m.lora_magnitude_vector.dtype == torch.float32  # as qlora keeps it, whatever the adapter dtype
    # nothing in the probe model pretends to be an adapter layer without being one
    assert not [m for m in model.modules() if hasattr(m, "lora_A") and not isinstance(m, AdapterLinear)]
    assert {p for p in model.parameters() if p.requires_grad} == {p for m in adapters for _, p in m.adapter_tensors()}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_probe_timeline_equals_the_recorded_one(setting, device):
    spec, targets = _llama()
    t = body_run(spec, 2, 16, 4, targets, device=device, **SETTINGS[setting])
    events, peak, peak_by_tag, sha = RECORDED[f"{setting}-{device}"]
    assert t.live.shape == (events, len(TAGS))
    assert int(t.live.sum(1).max()) == peak
    assert tuple(int(v) for v in t.live.max(0).values) == peak_by_tag
    assert hashlib.sha256(t.live.numpy().tobytes()).hexdigest()[:16] == sha  # every event, not only the peaks


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
@pytest.mark.parametrize("preset", ["all-linear", "attention", "qv", "mlp"])
def test_target_presets_resolve_like_qlora(arch, preset):
    spec = memory.spec_from_config(ARCHS[arch], arch)
    model = meta_model(spec.config)
    theirs = {n.split(".layers.", 1)[1].partition(".")[2] for n in qlora_resolve(model, preset)}
    assert set(resolve_targets(spec, preset)) == theirs


def test_import_memory_in_a_plain_script_never_imports_qlora():
    code = (
        "import sys, memory\n"
        "fp = memory.estimate('qwen2.5-0.5b', seq_len=256, rank=8, dora=True)\n"
        "assert fp.tensor_peak_bytes > 0\n"
        "assert not [m for m in sys.modules if m == 'qlora' or m.startswith('qlora.')], 'memory imported qlora'\n"
        "assert 'layers.dora' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "" and out.stderr == "", out.stderr[-2000:]  # the Python API never prints
