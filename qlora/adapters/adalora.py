"""AdaLoRA adapter files in PEFT's layout (``peft_type: ADALORA``), and AdaLoRA adapters as the LoRA they equal.

PEFT (0.21) writes ``base_model.model.<module>.lora_A`` ``(k, in)``, ``.lora_B`` ``(out, k)`` and
``.lora_E`` ``(k, 1)`` (no ``.weight`` suffix), with ``k`` the triplets the ``rank_pattern`` keeps
(``{"<module>.lora_E": [bool] * init_r}`` in ``adapter_config.json``; a module may keep none), and
scales by ``lora_alpha / (init_r + 1e-5)`` whatever ``k`` is. qlora writes the same, plus
``adalora_full.safetensors`` next to it: the unpruned ``init_r`` tensors a resumed run continues
from (a pruned triplet can come back at a later allocation). PEFT ignores that file.

Serving (``generate``, ``eval``, ``merge``, several adapters) goes through :func:`as_lora`:
``B·((A·x) ⊙ E)·alpha/(r0 + 1e-5)`` is the LoRA update with ``A' = A ⊙ E`` and
``alpha' = k·alpha/(r0 + 1e-5)``, exactly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from layers.adalora import AdaLoRALinear
from qlora.adapters.files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter, ModuleAdapter
from qlora.adapters.record import BaseRecord, base_record, parse_record, record_metadata
from qlora.lora.surgery import lora_modules
from qlora.lora.targets import suffix_targets
from quant.errors import InputError
from quant.files import atomic_dir

log = logging.getLogger(__name__)

FULL_NAME = "adalora_full.safetensors"
_KINDS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoRAAdapter:
    """An AdaLoRA adapter: per module ``(A (k, in), B (out, k), E (k, 1))`` as PEFT saves them (pruned).

    ``init_r`` is r0, the scale's denominator; ``full``: the unpruned tensors when the folder has them.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    alpha: float
    init_r: int
    config: dict = field(default_factory=dict)  # the schedule fields, as written
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    target_modules: list[str] | str | None = None
    base: BaseRecord | None = None
    full: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def write_adalora(model: nn.Module, out_dir: str | os.PathLike, schedule: dict | None, all_linear_names: list[str],
                  base_model_name_or_path: str | None = None) -> Path:
    """Write the model's AdaLoRA adapter as a PEFT AdaLoRA folder (atomically), plus the unpruned tensors.

    The rank pattern written is the triplets whose E is not zero: exactly what the model computes now (a
    pruned triplet has E = 0; between two allocations one may grow back, and then it counts). A model whose
    E are all zero (before any training) keeps every triplet, so the file is not empty.

    Args:
        schedule: :meth:`qlora.lora.adalora.AdaLoRASchedule.peft_fields`; None: a one-step schedule that
            keeps every triplet (what PEFT needs to load the file).

    Raises:
        InputError: the model has no AdaLoRA layers, or they differ in alpha, r0 or dropout.
    """
    layers = {n: m for n, m in lora_modules(model) if isinstance(m, AdaLoRALinear) and m.has_adapter}
    if not layers:
        raise InputError("The model has no AdaLoRA adapter to save.")
    for what in ("alpha", "ranknum", "dropout"):
        if len({getattr(m, what) for m in layers.values()}) > 1:
            raise InputError(f"Cannot save AdaLoRA layers with different {what} values: PEFT files have one.")
    first = next(iter(layers.values()))
    tensors, full, pattern = {}, {}, {}
    untrained = all(not bool((m.lora_E != 0).any()) for m in layers.values())
    for name, m in layers.items():
        a, b, e = (p.detach().to("cpu").contiguous() for _, p in m.adapter_tensors())
        keep = torch.ones(e.shape[0], dtype=torch.bool) if untrained else e.view(-1) != 0
        pattern[f"{name}.lora_E"] = keep.tolist()
        tensors |= {f"{PREFIX}{name}.lora_A": a[keep].contiguous(), f"{PREFIX}{name}.lora_B": b[:, keep].contiguous(),
                    f"{PREFIX}{name}.lora_E": e[keep].contiguous()}
        full |= {f"{name}.lora_A": a, f"{name}.lora_B": b, f"{name}.lora_E": e}
    alpha = first.alpha
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": first.dropout, "modules_to_save": None, "peft_type": "ADALORA", "rank_pattern": pattern,
        "revision": None, "target_modules": suffix_targets(list(layers), all_linear_names), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
        **(schedule or {"target_r": int(first.ranknum), "total_step": 1}), "init_r": int(first.ranknum),
    }
    out = Path(out_dir)
    meta = {"format": "pt", **record_metadata(base_record(model))}
    with atomic_dir(out, existing="merge", last=(CONFIG_NAME,)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        save_file(full, str(tmp / FULL_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    kept = sum(sum(v) for v in pattern.values())
    log.info("saved AdaLoRA adapter: %d modules, %d of %d triplets kept -> %s", len(layers), kept,
             len(layers) * int(first.ranknum), out)
    return out


def read_adalora(adapter_dir: str | os.PathLike) -> AdaLoRAAdapter:
    """Read and validate a PEFT AdaLoRA folder (and ``adalora_full.safetensors`` when present).

    Raises:
        InputError: missing files, a config that is not AdaLoRA or lacks init_r/lora_alpha, keys that are not
            AdaLoRA-on-linear, or shapes that disagree with the rank pattern.
    """
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(f"{str(d)!r} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "ADALORA":
        raise InputError(f"{cfg_path} is not an AdaLoRA config (peft_type 'ADALORA').")
    init_r, alpha = cfg.get("init_r"), cfg.get("lora_alpha")
    if not isinstance(init_r, int) or init_r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError(f"{cfg_path} needs a positive integer init_r and a numeric lora_alpha, got {init_r!r}, "
                         f"{alpha!r}.")
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out") or cfg.get("modules_to_save"):
        raise InputError(f"{cfg_path} sets bias, fan_in_fan_out or modules_to_save, which qlora does not support.")
    try:
        with safe_open(str(w_path), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
    except (SafetensorError, OSError) as e:
        raise InputError(f"{w_path} is not a readable safetensors file ({e}).") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        kind = next((k for k in _KINDS if key.endswith("." + k)), None)
        if not key.startswith(PREFIX) or kind is None:
            raise InputError(f"Adapter tensor {key!r} in {w_path} is not an AdaLoRA tensor ({PREFIX}<module>.lora_A, "
                             ".lora_B or .lora_E).")
        parts.setdefault(key[len(PREFIX): -len(kind) - 1], {})[kind] = t
    pattern = cfg.get("rank_pattern") or {}
    modules = {}
    for name, p in parts.items():
        if len(p) != 3:
            raise InputError(f"AdaLoRA module {name!r} in {w_path} lacks its {next(k for k in _KINDS if k not in p)}.")
        a, b, e = p["lora_A"], p["lora_B"], p["lora_E"]
        k = a.shape[0]
        want = sum(pattern.get(f"{name}.lora_E", [True] * init_r))
        if b.shape[1] != k or tuple(e.shape) != (k, 1) or k != want:
            raise InputError(f"AdaLoRA module {name!r} in {w_path}: lora_A {tuple(a.shape)}, lora_B "
                             f"{tuple(b.shape)}, lora_E {tuple(e.shape)} do not agree with each other and the rank "
                             f"pattern ({want} kept).")
        modules[name] = (a, b, e)
    full = None
    if (d / FULL_NAME).is_file():
        t = load_file(str(d / FULL_NAME))
        full = {n: (t[f"{n}.lora_A"], t[f"{n}.lora_B"], t[f"{n}.lora_E"]) for n in modules}
    schedule = {k: cfg[k] for k in ("target_r", "total_step", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                    "orth_reg_weight") if k in cfg}
    return AdaLoRAAdapter(modules, float(alpha), init_r, schedule, float(cfg.get("lora_dropout") or 0.0),
                          cfg.get("base_model_name_or_path"), cfg.get("target_modules"),
                          parse_record(metadata, w_path), full)


def as_lora(adapter: AdaLoRAAdapter) -> Adapter:
    """The exactly equal LoRA: ``A' = A ⊙ E``, ``B' = B``, ``alpha' = k·alpha/(r0 + 1e-5)``; modules keeping no
    triplet are left out (they add nothing)."""
    mods = {}
    for name, (a, b, e) in adapter.modules.items():
        k = a.shape[0]
        if k == 0:
            continue
        mods[name] = ModuleAdapter(a.float() * e.float(), b.float(), k * adapter.alpha / (adapter.init_r + 1e-5))
    if not mods:
        raise InputError("This AdaLoRA adapter keeps no triplet in any module: it is the base model unchanged.")
    log.info("AdaLoRA adapter (r0=%d, %d of %d modules keep triplets) runs as the equal LoRA", adapter.init_r,
             len(mods), len(adapter.modules))
    return Adapter(mods, adapter.dropout, adapter.base_model_name_or_path, adapter.target_modules, adapter.base)


def install_adalora(model: nn.Module, adapter: AdaLoRAAdapter, trainable: bool = False, only=None) -> None:
    """Load an AdaLoRA adapter's unpruned tensors into the model's AdaLoRA layers (a resume).

    Raises:
        InputError: a folder without ``adalora_full.safetensors``, or modules/shapes this model lacks.
    """
    if adapter.full is None:
        raise InputError(f"The AdaLoRA adapter has no {FULL_NAME} (the unpruned tensors qlora writes); a PEFT "
                         "AdaLoRA file can be served, not resumed.")
    layers = dict(lora_modules(model))
    for name, (a, b, e) in adapter.full.items():
        if only is not None and name not in only:
            continue
        layer = layers.get(name)
        if not isinstance(layer, AdaLoRALinear):
            raise InputError(f"AdaLoRA module {name!r} is not an AdaLoRA layer of this model.")
        layer.load_svd(a, b, e, adapter.alpha, adapter.init_r, trainable, dtype=layer.lora_A.weight.dtype)

