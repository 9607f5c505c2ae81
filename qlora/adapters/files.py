"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``...lora_B.weight`` ``(out, r)`` and, for DoRA, ``...lora_magnitude_vector``
``(out,)``; config fields are PEFT's (written and checked by
:mod:`qlora.adapters.peft_config`), so ``peft.PeftModel.from_pretrained``
loads what we write and we load what it writes. Nothing here imports peft. The weights file's header metadata also
records the base the adapter was trained on (:mod:`qlora.adapters.record`),
which PEFT ignores.

The in-memory form is :class:`Adapter`: one :class:`ModuleAdapter` (tensors
plus alpha and the scale rule) per adapted module. Loading validates
everything against the model before touching it, so a bad file never leaves
a half-loaded model behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from layers.adalora import AdaLoRALinear
from layers.base import AdapterLinear
from layers.delta import DeltaLoRALinear
from layers.dora import DoRALinear
from layers.lora import LoRALinear
from layers.vera import VeRALinear
from qlora.adapters.peft_config import adapter_config, check_config, most_common
from qlora.adapters.record import BaseRecord, base_record, parse_record, record_metadata
from qlora.lora.surgery import LoRAReport, adapter_dtype, freeze_model, lora_modules, lora_report, replace_module
from qlora.lora.targets import linear_layers, pattern_value
from quant.errors import InputError
from quant.files import atomic_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KINDS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m", "lora_magnitude_vector.weight": "m"}


@dataclass
class ModuleAdapter:
    """One module's adapter: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, DoRA ``magnitude`` ``(out,)`` or None.

    ``wide_A``: ``lora_A`` is a VeRA adapter's ``(r, max_in)`` (:func:`qlora.adapters.vera.as_lora`): a layer
    takes its first ``in`` columns, which is exactly VeRA's slice.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None
    wide_A: bool = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank**0.5 if self.use_rslora else self.alpha / self.rank


@dataclass
class Adapter:
    """An adapter in memory: module name -> :class:`ModuleAdapter`, plus file-level fields.

    ``base`` is the base it was trained on (:class:`qlora.adapters.record.BaseRecord`), None when unknown.
    """

    modules: dict[str, ModuleAdapter]
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    target_modules: list[str] | str | None = field(default=None)
    base: BaseRecord | None = None

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


def module_adapter(layer: AdapterLinear) -> ModuleAdapter:
    """One adapter layer's adapter as a :class:`ModuleAdapter` (tensors are detached references, not copies).

    A VeRA layer gives its equal LoRA (float32 copies ``d ⊙ A`` and ``b ⊙ B``, scale 1); a Delta-LoRA layer
    its update against the original base (alpha ``alpha·(1+λ)``: the base's implicit part included).
    """
    if isinstance(layer, VeRALinear):
        a, b = layer.lora_factors()
        return ModuleAdapter(a, b, float(layer.rank))
    if isinstance(layer, AdaLoRALinear):  # A ⊙ E with the same scale: alpha'/r = alpha/(r0 + 1e-5)
        a, b = layer.lora_factors()
        return ModuleAdapter(a, b, layer.rank * layer.scale)
    t = {kind: p.detach() for kind, p in layer.adapter_tensors()}
    alpha = layer.saved_alpha if isinstance(layer, DeltaLoRALinear) else layer.alpha  # Delta-LoRA: with its base's part
    return ModuleAdapter(t["lora_A"], t["lora_B"], alpha, layer.use_rslora, t.get("lora_magnitude_vector"))


def adapter_from_model(model: nn.Module) -> Adapter:
    """The active adapter of every adapter layer (tensors are references, not copies).

    Its ``base`` is read off the model's layers (:func:`qlora.adapters.record.base_record`).

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
    return Adapter(mods, most_common(dropouts), name_or_path, base=base_record(model))


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                 initial=None, *, adapter: Adapter | None = None, linear_names: list[str] | None = None,
                 adalora: dict | None = None) -> Path:
    """Write the model's active adapter as a PEFT adapter folder (atomically). Returns the folder.

    ``base_model_name_or_path`` defaults to ``model.config._name_or_path``. The
    base's format (4-bit type, blocksize, double quant, or 16-bit; and its
    dtype) is found from the model's layers and recorded in the weights file.
    ``initial``: the :class:`qlora.lora.inits.InitialFactors` of a PiSSA/OLoRA/LoftQ init; the adapter is
    then written for the original base (rank 2r, :func:`qlora.lora.inits.to_original_base`).
    ``adapter``, ``linear_names``: the model's adapter and linear-layer names when the caller has them already
    (gathered from FSDP2's shards, read before sharding); default: read off ``model``.
    ``adalora``: an AdaLoRA model's schedule fields for its PEFT config (:func:`qlora.adapters.adalora.write_adalora`).

    Raises:
        InputError: no adapter on the model, or a mix PEFT cannot express
            (DoRA on some modules only, rsLoRA on some modules only).
    """
    names = list(linear_layers(model)) if linear_names is None else linear_names
    if adapter is None and any(isinstance(m, AdaLoRALinear) for _, m in lora_modules(model)):
        from qlora.adapters.adalora import write_adalora

        name_or_path = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        return write_adalora(model, out_dir, adalora, names, name_or_path or None)
    if adapter is None and any(isinstance(m, VeRALinear) for _, m in lora_modules(model)):
        from qlora.adapters.vera import vera_from_model, write_vera

        vera = vera_from_model(model)
        vera.base_model_name_or_path = base_model_name_or_path or vera.base_model_name_or_path
        return write_vera(vera, out_dir, names)
    adapter = adapter_from_model(model) if adapter is None else adapter
    if base_model_name_or_path is not None:
        adapter.base_model_name_or_path = base_model_name_or_path
    if initial is not None:
        from qlora.lora.inits import to_original_base

        adapter.modules = to_original_base(adapter.modules, initial)
    return write_adapter(adapter, out_dir, names)


def write_adapter(adapter: Adapter, out_dir: str | os.PathLike, all_linear_names: list[str] | None = None) -> Path:
    """Write ``adapter`` as ``out_dir/adapter_config.json`` + ``adapter_model.safetensors``.

    Atomic (:func:`quant.files.atomic_dir`): a new folder is written under a
    temporary name and renamed; an existing folder (a run's output folder
    that also holds checkpoints) gets each file renamed over the old one,
    weights first and config last, so a crash never leaves a truncated file
    and a new folder never shows a config without its weights (replacing an
    adapter in place, the new weights sit next to the old config for the
    moment between the two renames).
    Tensors are saved in their own dtype; ``adapter.base``, when known, goes
    into the weights file's metadata (:func:`qlora.adapters.record.record_metadata`).

    Raises:
        InputError: ``out_dir`` is an existing file; a VeRA adapter read as LoRA (write it with
            :func:`qlora.adapters.vera.write_vera`); see :func:`adapter_config`.
    """
    if any(m.wide_A for m in adapter.modules.values()):
        raise InputError("This adapter is a VeRA adapter read as its equal LoRA; it is written as VeRA "
                         "(qlora.adapters.vera.write_vera) or, once installed in a model, saved from the model.")
    config = adapter_config(adapter, all_linear_names)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
        if m.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.magnitude.detach().to("cpu").contiguous()
    out = Path(out_dir)
    with atomic_dir(out, existing="merge", last=(CONFIG_NAME,)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **record_metadata(adapter.base)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    base = f"trained on {adapter.base.describe()}" if adapter.base else "no base recorded"
    log.info("saved adapter: %d modules, %d tensors, %s -> %s", len(adapter.modules), len(tensors), base, out)
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (tensors stay in their file dtype, on CPU).

    The returned adapter's ``base`` is the file's record of its training base, or None. A VeRA
    folder (``peft_type: VERA``) is read as the LoRA it equals (:func:`qlora.adapters.vera.as_lora`).

    Raises:
        InputError: missing files, ``peft_type`` other than ``LORA``, options
            qlora does not implement (named), keys that are not LoRA-on-linear,
            a rank that disagrees with ``r``/``rank_pattern``, an unreadable base record, or a NaN or
            infinite value (naming the module and the tensor).
    """
    adapter = _read_adapter(Path(adapter_dir))
    for name, m in adapter.modules.items():  # a NaN adapter would load, generate nothing and merge into NaNs
        for what, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B), ("lora_magnitude_vector", m.magnitude)):
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InputError(f"Adapter {str(adapter_dir)!r}: {what} of module {name!r} holds {bad} NaN or "
                                 f"infinite value(s) of {t.numel()}; the run that wrote it diverged. Use an earlier "
                                 "checkpoint of that run.")
    return adapter


def _read_adapter(adapter_dir: Path) -> Adapter:
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
    if isinstance(cfg, dict) and cfg.get("peft_type") == "VERA":
        from qlora.adapters.vera import as_lora, read_vera

        return as_lora(read_vera(d))
    if isinstance(cfg, dict) and cfg.get("peft_type") == "ADALORA":
        from qlora.adapters.adalora import as_lora, read_adalora

        return as_lora(read_adalora(d))
    check_config(cfg, cfg_path)
    try:
        with safe_open(str(w_path), "pt") as f:  # what safetensors' load_file does, plus the metadata
            raw = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
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
    base = parse_record(metadata, w_path)
    return Adapter(modules, dropout, cfg.get("base_model_name_or_path"), cfg.get("target_modules"), base)


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
        a_in = din if not m.wide_A or m.lora_A.shape[1] < din else m.lora_A.shape[1]  # VeRA: the first din columns
        checks = [("lora_A", tuple(m.lora_A.shape), (m.rank, a_in)), ("lora_B", tuple(m.lora_B.shape), (dout, m.rank))]
        if m.magnitude is not None:
            checks.append(("lora_magnitude_vector", tuple(m.magnitude.shape), (dout,)))
        for what, got, want in checks:
            if got != want:
                raise InputError(
                    f"Adapter {what} for module {name!r} has shape {got}, but the base layer (in={din}, "
                    f"out={dout}) needs {want}. The adapter was trained on a different base model."
                )
        found[name] = layer
    _warn_coverage(layers, adapter)
    return found


def _warn_coverage(layers: dict[str, nn.Module], adapter: Adapter) -> None:
    """Warn where the weights and the config's ``target_modules`` disagree; the weights are what runs.

    The rule: every module with tensors in the file is applied, and nothing else (PEFT also leaves a
    targeted layer without tensors at its initial, zero update). A disagreement usually means a file cut
    short or a config edited by hand, so it is said, not silently followed.
    """
    targets = adapter.target_modules
    if not isinstance(targets, list) or not targets:  # a regex or "all-linear": nothing exact to compare
        return
    wanted = {n for n in layers if any(n == t or n.endswith("." + t) for t in targets)}  # PEFT's suffix match
    missing, extra = sorted(wanted - set(adapter.modules)), sorted(set(adapter.modules) - wanted)
    if missing:
        log.warning("the adapter's config targets %d layers of this model (%s) but its weights cover %d of them; "
                    "the other %d run without an update (e.g. %s)", len(wanted), ", ".join(targets),
                    len(wanted) - len(missing), len(missing), missing[0])
    if extra:
        log.warning("the adapter's weights hold %d modules its config's target_modules (%s) do not name (e.g. %s); "
                    "they are applied", len(extra), ", ".join(targets), extra[0])


def install_module_adapter(
    module: AdapterLinear, m: ModuleAdapter, dtype: torch.dtype | None, trainable: bool, dropout: float
) -> None:
    """Put ``m``'s tensors (copied to the base's device, in ``dtype`` or their own) into ``module``.

    See :meth:`layers.base.AdapterLinear.install` (DoRA magnitudes stay float32).

    Raises:
        InputError: ``m`` does not fit ``module`` (shapes, or DoRA into a ``LoRALinear`` and back).
    """
    a = m.lora_A[:, : module.in_features] if m.wide_A else m.lora_A
    module.install(
        a, m.lora_B, m.alpha, use_rslora=m.use_rslora, magnitude=m.magnitude, dropout=dropout,
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
    model: nn.Module, adapter: Adapter, dtype: torch.dtype | str | None = None, trainable: bool = False,
    only: Collection[str] | None = None,
) -> LoRAReport | None:
    """Install ``adapter`` into ``model`` in place, wrapping layers in ``LoRALinear``/``DoRALinear`` where needed.

    The whole model is frozen first; adapter parameters get
    ``requires_grad=trainable``. A layer of the right type is filled in
    place; a bare linear, or a layer of the other variant (a DoRA file on a
    ``LoRALinear`` and back), is replaced by a new layer around the same
    base. LoRA modules the adapter does not cover become pass-throughs.
    ``dtype=None`` keeps the file's dtype.

    ``only``: touch (and freeze) just these modules, for a loader going unit by unit (check the whole
    adapter with :func:`check_adapter_fits` first); returns None then, as the model is not complete yet.

    Raises:
        InputError: see :func:`check_adapter_fits`; nothing is changed then.
    """
    dtype = None if dtype is None else adapter_dtype(dtype)
    if only is not None:
        adapter = replace(adapter, modules={n: m for n, m in adapter.modules.items() if n in only})
    layers = check_adapter_fits(model, adapter)
    merged = [n for n, m in lora_modules(model) if m.merged]
    if merged:
        raise InputError(
            f"Cannot load an adapter while LoRA modules are merged ({merged[0]}, ...); call qlora.unmerge first."
        )
    for part in [model] if only is None else [model.get_submodule(n) for n in only]:
        freeze_model(part)  # with ``only``, not the others: they may hold trainable adapters already
    for name, layer in layers.items():
        m = adapter.modules[name]
        if isinstance(layer, layer_class(m)):
            install_module_adapter(layer, m, dtype, trainable, adapter.dropout)
        else:
            replace_module(model, name, adapter_layer(layer, m, dtype, trainable, adapter.dropout))
    for name, mod in lora_modules(model):
        if name not in adapter.modules and mod.has_adapter and (only is None or name in only):
            mod.clear()
            log.info("module %s is not covered by the loaded adapter; it now runs the base layer only", name)
    if only is not None:
        return None
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
