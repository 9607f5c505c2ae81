"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``...lora_B.weight`` ``(out, r)`` and, for DoRA, ``...lora_magnitude_vector``
``(out,)``; config fields are PEFT's (``r``, ``lora_alpha``, ``rank_pattern``,
``alpha_pattern``, ``use_rslora``, ``use_dora``, ``target_modules``...), so
``peft.PeftModel.from_pretrained`` loads what we write and we load what it
writes. Nothing here imports peft.

The in-memory form is :class:`Adapter`: one :class:`ModuleAdapter` (tensors
plus alpha and the scale rule) per adapted module. Loading validates
everything against the model before touching it, so a bad file never leaves
a half-loaded model behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layers.base import AdapterLinear
from layers.dora import DoRALinear
from layers.lora import LoRALinear
from qlora.lora.surgery import LoRAReport, adapter_dtype, freeze_model, lora_modules, lora_report, replace_module
from qlora.lora.targets import linear_layers, pattern_value, suffix_targets
from quant.errors import InputError
from quant.files import atomic_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KINDS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m", "lora_magnitude_vector.weight": "m"}
# Config options that change the math or touch more than LoRA-on-linear; we refuse them instead of
# loading something that would compute different outputs than PEFT.
_UNSUPPORTED_TRUTHY = (
    "fan_in_fan_out", "lora_bias", "modules_to_save", "target_parameters", "trainable_token_indices",
    "layer_replication", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class ModuleAdapter:
    """One module's adapter: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, DoRA ``magnitude`` ``(out,)`` or None."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank**0.5 if self.use_rslora else self.alpha / self.rank


@dataclass
class Adapter:
    """An adapter in memory: module name -> :class:`ModuleAdapter`, plus file-level fields."""

    modules: dict[str, ModuleAdapter]
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    target_modules: list[str] | str | None = field(default=None)

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


def module_adapter(layer: AdapterLinear) -> ModuleAdapter:
    """One adapter layer's adapter as a :class:`ModuleAdapter` (tensors are detached references, not copies)."""
    t = {kind: p.detach() for kind, p in layer.adapter_tensors()}
    return ModuleAdapter(t["lora_A"], t["lora_B"], layer.alpha, layer.use_rslora, t.get("lora_magnitude_vector"))


def adapter_from_model(model: nn.Module) -> Adapter:
    """The active adapter of every adapter layer (tensors are references, not copies).

    Raises:
        InputError: the model has no LoRA modules.
    """
    mods: dict[str, ModuleAdapter] = {}
    dropouts = []
    for name, m in lora_modules(model):
        if not m.has_adapter:
            continue
        mods[name] = module_adapter(m)
        dropouts.append(m.dropout)
    if not mods:
        raise InputError("The model has no LoRA adapter to save; call qlora.apply_lora or load an adapter first.")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return Adapter(mods, _most_common(dropouts), name_or_path)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's active adapter as a PEFT adapter folder (atomically). Returns the folder.

    ``base_model_name_or_path`` defaults to ``model.config._name_or_path``.

    Raises:
        InputError: no adapter on the model, or a mix PEFT cannot express
            (DoRA on some modules only, rsLoRA on some modules only).
    """
    adapter = adapter_from_model(model)
    if base_model_name_or_path is not None:
        adapter.base_model_name_or_path = base_model_name_or_path
    return write_adapter(adapter, out_dir, list(linear_layers(model)))


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def adapter_config(adapter: Adapter, all_linear_names: list[str] | None = None) -> dict:
    """The ``adapter_config.json`` dict for ``adapter`` (PEFT 0.21 field names).

    ``r``/``lora_alpha`` are the most common values; other modules go into
    ``rank_pattern``/``alpha_pattern`` under their full names (regex-escaped
    only where a plain name would also match another module).

    Raises:
        InputError: DoRA or rsLoRA on only some modules (one flag per file in PEFT).
    """
    mods = adapter.modules
    for flag, vals in (("use_dora", [m.magnitude is not None for m in mods.values()]),
                       ("use_rslora", [m.use_rslora for m in mods.values()])):
        if len(set(vals)) > 1:
            raise InputError(
                f"Cannot save an adapter with {flag} on some modules only; PEFT files have one {flag} flag."
            )
    names = list(mods)
    r = _most_common([m.rank for m in mods.values()])
    alpha = _most_common([m.alpha for m in mods.values()])
    rank_pattern = _patterns({n: m.rank for n, m in mods.items()}, r)
    alpha_pattern = _patterns({n: m.alpha for n, m in mods.items()}, alpha)
    targets = suffix_targets(names, all_linear_names or names)
    first = next(iter(mods.values()))
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": adapter.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": first.magnitude is not None,
        "use_rslora": first.use_rslora,
    }


def _patterns(values: dict[str, float], default) -> dict:
    """Per-module overrides keyed by full module name; checked to resolve back exactly under PEFT's rule."""
    pattern = {n: v for n, v in values.items() if v != default}
    if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
        return pattern
    return {re.escape(n): v for n, v in pattern.items()}


def write_adapter(adapter: Adapter, out_dir: str | os.PathLike, all_linear_names: list[str] | None = None) -> Path:
    """Write ``adapter`` as ``out_dir/adapter_config.json`` + ``adapter_model.safetensors``.

    Atomic (:func:`quant.files.atomic_dir`): a new folder is written under a
    temporary name and renamed; an existing folder (a run's output folder
    that also holds checkpoints) gets each file renamed over the old one,
    weights first and config last, so a crash never leaves a truncated file
    and a new folder never shows a config without its weights (replacing an
    adapter in place, the new weights sit next to the old config for the
    moment between the two renames).
    Tensors are saved in their own dtype.

    Raises:
        InputError: ``out_dir`` is an existing file; see :func:`adapter_config`.
    """
    config = adapter_config(adapter, all_linear_names)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
        if m.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.magnitude.detach().to("cpu").contiguous()
    out = Path(out_dir)
    with atomic_dir(out, existing="merge", last=(CONFIG_NAME,)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("saved adapter: %d modules, %d tensors -> %s", len(adapter.modules), len(tensors), out)
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (tensors stay in their file dtype, on CPU).

    Raises:
        InputError: missing files, ``peft_type`` other than ``LORA``, options
            qlora does not implement (named), keys that are not LoRA-on-linear,
            or a rank that disagrees with ``r``/``rank_pattern``.
    """
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(
            f"{str(d)!r} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"(PEFT's layout; .bin adapters are not read because they are pickles)."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e}).") from None
    _check_config(cfg, cfg_path)
    try:
        raw = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{w_path} is not a readable safetensors file ({e}).") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            raise InputError(f"Adapter tensor {key!r} in {w_path} does not start with {PREFIX!r} (PEFT's key prefix).")
        rest = key[len(PREFIX):]
        kind = next((k for k in _KINDS if rest.endswith("." + k)), None)
        if kind is None:
            raise InputError(
                f"Adapter tensor {key!r} is not a LoRA-on-linear tensor (lora_A.weight, lora_B.weight or "
                f"lora_magnitude_vector); embedding/conv LoRA and trained extra modules are not supported."
            )
        parts.setdefault(rest[: -len(kind) - 1], {})[_KINDS[kind]] = t
    r_default, alpha_default = cfg["r"], cfg["lora_alpha"]
    use_rslora, use_dora = bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False))
    modules: dict[str, ModuleAdapter] = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            missing = "lora_A" if "A" not in p else "lora_B"
            raise InputError(f"Adapter module {name!r} in {w_path} lacks its {missing} tensor.")
        if use_dora != ("m" in p):
            raise InputError(
                f"Adapter module {name!r}: use_dora is {use_dora} in {CONFIG_NAME} but the file "
                f"{'lacks' if use_dora else 'has'} its lora_magnitude_vector."
            )
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(
                f"Adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "(r, in) and (out, r)."
            )
        r = pattern_value(cfg.get("rank_pattern"), name, r_default)
        if r != a.shape[0]:
            raise InputError(
                f"Adapter module {name!r} has rank {a.shape[0]} but {CONFIG_NAME} (r/rank_pattern) says {r}."
            )
        alpha = float(pattern_value(cfg.get("alpha_pattern"), name, alpha_default))
        modules[name] = ModuleAdapter(a, b, alpha, use_rslora, p.get("m"))
    if not modules:
        raise InputError(f"{w_path} holds no LoRA tensors.")
    dropout = float(cfg.get("lora_dropout") or 0.0)
    return Adapter(modules, dropout, cfg.get("base_model_name_or_path"), cfg.get("target_modules"))


def _check_config(cfg: dict, path: Path) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"{path} has peft_type {peft_type!r}; qlora reads LoRA adapters only (peft_type 'LORA'), "
            "including DoRA and rsLoRA ones."
        )
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        log.warning("%s has task_type %r; loading its LoRA weights onto a causal LM anyway", path, task)
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise InputError(f"{path} lacks a numeric {key!r} field, got {cfg.get(key)!r}.")
    if cfg.get("bias", "none") != "none":
        raise InputError(
            f"{path} has bias={cfg['bias']!r}; qlora supports bias='none' only (trained biases are not LoRA)."
        )
    for key in _UNSUPPORTED_TRUTHY:
        if cfg.get(key):
            raise InputError(
                f"{path} sets {key}={cfg[key]!r}, which qlora does not support; valid adapters leave it unset."
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputError(
            f"{path} has init_lora_weights={init!r}, which modifies the base weights; convert it to a plain LoRA "
            "adapter first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )


def check_adapter_fits(model: nn.Module, adapter: Adapter) -> dict[str, nn.Module]:
    """Check every module of ``adapter`` against the model; returns name -> current layer.

    Raises:
        InputError: a module the model lacks or that is not linear (listing the
            model's linear layers), or a tensor shape that does not match the
            base layer (naming the module and both shapes).
    """
    layers = linear_layers(model)
    found = {}
    for name, m in adapter.modules.items():
        layer = layers.get(name)
        if layer is None:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise InputError(
                f"Adapter module {name!r} is not a linear layer of this model; the model's linear layers are "
                f"named {', '.join(leaves)} (e.g. {next(iter(layers), 'none')}). Is this adapter for another "
                "base model?"
            )
        din, dout = layer.in_features, layer.out_features
        checks = [("lora_A", tuple(m.lora_A.shape), (m.rank, din)), ("lora_B", tuple(m.lora_B.shape), (dout, m.rank))]
        if m.magnitude is not None:
            checks.append(("lora_magnitude_vector", tuple(m.magnitude.shape), (dout,)))
        for what, got, want in checks:
            if got != want:
                raise InputError(
                    f"Adapter {what} for module {name!r} has shape {got}, but the base layer (in={din}, "
                    f"out={dout}) needs {want}. The adapter was trained on a different base model."
                )
        found[name] = layer
    return found


def install_module_adapter(
    module: AdapterLinear, m: ModuleAdapter, dtype: torch.dtype | None, trainable: bool, dropout: float
) -> None:
    """Put ``m``'s tensors (copied to the base's device, in ``dtype`` or their own) into ``module``.

    See :meth:`layers.base.AdapterLinear.install` (DoRA magnitudes stay float32).

    Raises:
        InputError: ``m`` does not fit ``module`` (shapes, or DoRA into a ``LoRALinear`` and back).
    """
    module.install(
        m.lora_A, m.lora_B, m.alpha, use_rslora=m.use_rslora, magnitude=m.magnitude, dropout=dropout,
        trainable=trainable, dtype=dtype,
    )


def layer_class(m: ModuleAdapter) -> type[AdapterLinear]:
    """The adapter layer type that runs ``m``: ``DoRALinear`` when it has a magnitude, else ``LoRALinear``."""
    return LoRALinear if m.magnitude is None else DoRALinear


def adapter_layer(
    layer: nn.Module, m: ModuleAdapter, dtype: torch.dtype | None, trainable: bool, dropout: float
) -> AdapterLinear:
    """A new adapter layer of :func:`layer_class` holding ``m``, around ``layer`` (or ``layer``'s base).

    An adapter layer's ``base_layer`` is shared, not copied: a bank of
    adapters for one position all wrap the same frozen base. Costs one copy
    of ``m``'s tensors (no norm or random init is computed first).
    """
    base = layer.base_layer if isinstance(layer, AdapterLinear) else layer
    new = layer_class(m)(base, m.rank, m.alpha, init=None, dtype=dtype or m.lora_A.dtype)
    install_module_adapter(new, m, dtype, trainable, dropout)
    return new


def install_adapter(
    model: nn.Module, adapter: Adapter, dtype: torch.dtype | str | None = None, trainable: bool = False
) -> LoRAReport:
    """Install ``adapter`` into ``model`` in place, wrapping layers in ``LoRALinear``/``DoRALinear`` where needed.

    The whole model is frozen first; adapter parameters get
    ``requires_grad=trainable``. A layer of the right type is filled in
    place; a bare linear, or a layer of the other variant (a DoRA file on a
    ``LoRALinear`` and back), is replaced by a new layer around the same
    base. LoRA modules the adapter does not cover become pass-throughs.
    ``dtype=None`` keeps the file's dtype.

    Raises:
        InputError: see :func:`check_adapter_fits`; nothing is changed then.
    """
    dtype = None if dtype is None else adapter_dtype(dtype)
    layers = check_adapter_fits(model, adapter)
    merged = [n for n, m in lora_modules(model) if m.merged]
    if merged:
        raise InputError(
            f"Cannot load an adapter while LoRA modules are merged ({merged[0]}, ...); call qlora.unmerge first."
        )
    freeze_model(model)
    for name, layer in layers.items():
        m = adapter.modules[name]
        if isinstance(layer, layer_class(m)):
            install_module_adapter(layer, m, dtype, trainable, adapter.dropout)
        else:
            replace_module(model, name, adapter_layer(layer, m, dtype, trainable, adapter.dropout))
    for name, mod in lora_modules(model):
        if name not in adapter.modules and mod.has_adapter:
            mod.clear()
            log.info("module %s is not covered by the loaded adapter; it now runs the base layer only", name)
    report = lora_report(model)
    log.info("installed adapter (%s) on %d modules; trainable=%s", dtype or "file dtype", len(layers), trainable)
    return report


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, dtype: torch.dtype | str | None = None, trainable: bool = False
) -> LoRAReport:
    """Read a PEFT adapter folder and install it into ``model`` (in place). See :func:`install_adapter`.

    Raises:
        InputError: bad folder/config (see :func:`read_adapter`) or shapes
            that do not match the base (see :func:`check_adapter_fits`).
    """
    return install_adapter(model, read_adapter(adapter_dir), dtype, trainable)
