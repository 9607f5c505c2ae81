"""VeRA adapter files in PEFT's layout (``peft_type: VERA``), and VeRA adapters as the LoRA they equal.

Keys (PEFT 0.21): ``base_model.model.<module>.vera_lambda_b`` ``(out,)``,
``...vera_lambda_d`` ``(r,)``, and the shared ``base_model.vera_A`` ``(r, max_in)`` and
``base_model.vera_B`` ``(max_out, r)`` (PEFT's ``save_projection: true``; qlora always writes them,
so the file does not depend on a random generator's implementation). Config fields are
``VeraConfig``'s: ``r``, ``projection_prng_key``, ``save_projection``, ``vera_dropout``, ``d_initial``,
``target_modules``.

Serving a VeRA file (``generate``, ``eval``, ``merge``, several adapters) goes through
:func:`as_lora`: ``b ⊙ B·(d ⊙ A·x)`` is exactly the LoRA update ``B'·A'·x`` with
``A' = d ⊙ A[:, :in]``, ``B' = b ⊙ B[:out]`` and scale 1, so every LoRA path runs it unchanged.
The cost is ``r·(in + out)`` numbers per layer instead of the shared pair; training keeps the
shared form (:mod:`qlora.lora.vera`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from layers.vera import D_INITIAL, VeRALinear, VeRAProjections
from qlora.adapters.files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter, ModuleAdapter
from qlora.adapters.peft_config import most_common
from qlora.adapters.record import BaseRecord, base_record, parse_record, record_metadata
from qlora.lora.surgery import lora_modules
from qlora.lora.targets import suffix_targets
from qlora.lora.vera import vera_projections
from quant.errors import InputError
from quant.files import atomic_dir

log = logging.getLogger(__name__)

SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")
_VECTORS = ("vera_lambda_b", "vera_lambda_d")


@dataclass
class VeRAAdapter:
    """A VeRA adapter in memory: per module ``(lambda_b (out,), lambda_d (r,))``, plus the shared matrices.

    ``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)``; ``base`` as :class:`qlora.adapters.files.Adapter`.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    vera_A: torch.Tensor
    vera_B: torch.Tensor
    projection_prng_key: int = 0
    d_initial: float = D_INITIAL
    dropout: float = 0.0
    base_model_name_or_path: str | None = None
    target_modules: list[str] | str | None = field(default=None)
    base: BaseRecord | None = None

    @property
    def rank(self) -> int:
        return self.vera_A.shape[0]


def vera_from_model(model: nn.Module) -> VeRAAdapter:
    """The model's VeRA adapter (tensors are references, not copies).

    Raises:
        InputError: the model has no VeRA layers.
    """
    proj = vera_projections(model)
    layers = [(n, m) for n, m in lora_modules(model) if isinstance(m, VeRALinear) and m.has_adapter]
    if proj is None or not layers:
        raise InputError("The model has no VeRA adapter to save; call qlora.lora.vera.apply_vera first.")
    first = layers[0][1]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return VeRAAdapter(
        {n: (m.vera_lambda_b.detach(), m.vera_lambda_d.detach()) for n, m in layers}, proj.vera_A, proj.vera_B,
        0 if proj.key is None else proj.key,  # None: matrices read from a file, which holds them; the key is a label
        first.d_initial, most_common([m.dropout for _, m in layers]),
        name_or_path, base=base_record(model),
    )


def write_vera(adapter: VeRAAdapter, out_dir: str | os.PathLike, all_linear_names: list[str] | None = None) -> Path:
    """Write ``adapter`` as a PEFT VeRA folder, atomically as :func:`qlora.adapters.files.write_adapter` does.

    The vectors and matrices are written in float32 (PEFT's dtype; the matrices hold exactly the values
    the adapter trained with, rounded to its compute dtype).
    """
    names = list(adapter.modules)
    config = {
        "auto_mapping": None, "base_model_name_or_path": adapter.base_model_name_or_path, "bias": "none",
        "d_initial": adapter.d_initial, "fan_in_fan_out": False, "inference_mode": True, "init_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "peft_type": "VERA",
        "projection_prng_key": adapter.projection_prng_key, "r": adapter.rank, "revision": None,
        "save_projection": True, "target_modules": suffix_targets(names, all_linear_names or names),
        "task_type": "CAUSAL_LM", "vera_dropout": adapter.dropout,
    }

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    tensors = {SHARED_KEYS[0]: cpu(adapter.vera_A), SHARED_KEYS[1]: cpu(adapter.vera_B)}
    for name, (lam_b, lam_d) in adapter.modules.items():
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = cpu(lam_b)
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = cpu(lam_d)
    out = Path(out_dir)
    with atomic_dir(out, existing="merge", last=(CONFIG_NAME,)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **record_metadata(adapter.base)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("saved VeRA adapter: %d modules, r=%d, shared matrices %s and %s -> %s", len(names), adapter.rank,
             tuple(adapter.vera_A.shape), tuple(adapter.vera_B.shape), out)
    return out


def read_vera(adapter_dir: str | os.PathLike) -> VeRAAdapter:
    """Read and validate a PEFT VeRA folder (tensors in their file dtype, on CPU).

    Raises:
        InputError: missing files, a config that is not VeRA or that qlora cannot run as PEFT would
            (``save_projection: false``, trained biases, fan_in_fan_out), keys that are not VeRA-on-linear,
            or shapes that disagree with ``r`` or with each other.
    """
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(f"{str(d)!r} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e}).") from None
    _check_vera_config(cfg, cfg_path)
    try:
        with safe_open(str(w_path), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
    except (SafetensorError, OSError) as e:
        raise InputError(f"{w_path} is not a readable safetensors file ({e}).") from None
    missing = [k for k in SHARED_KEYS if k not in raw]
    if missing:
        raise InputError(f"{w_path} lacks the shared VeRA matrix {missing[0]!r}; it was saved with "
                         "save_projection false, which qlora does not read. Save it again with save_projection true.")
    vera_A, vera_B = raw.pop(SHARED_KEYS[0]), raw.pop(SHARED_KEYS[1])
    r = cfg["r"]
    try:
        VeRAProjections(vera_A, vera_B)  # the shape checks
    except InputError as e:
        raise InputError(f"{w_path}: {e}") from None
    if vera_A.shape[0] != r:
        raise InputError(f"{w_path} holds VeRA matrices of rank {vera_A.shape[0]} but {CONFIG_NAME} says r={r}.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        kind = next((k for k in _VECTORS if key.endswith("." + k)), None)
        if not key.startswith(PREFIX) or kind is None:
            raise InputError(f"Adapter tensor {key!r} in {w_path} is not a VeRA tensor ({PREFIX}<module>.vera_lambda_b "
                             "or .vera_lambda_d, or the shared base_model.vera_A / base_model.vera_B).")
        parts.setdefault(key[len(PREFIX): -len(kind) - 1], {})[kind] = t
    modules = {}
    for name, p in parts.items():
        if len(p) != 2:
            raise InputError(f"VeRA module {name!r} in {w_path} lacks its {next(k for k in _VECTORS if k not in p)}.")
        lam_b, lam_d = p["vera_lambda_b"], p["vera_lambda_d"]
        if lam_d.shape != (r,) or lam_b.ndim != 1 or lam_b.shape[0] > vera_B.shape[0]:
            raise InputError(f"VeRA module {name!r} in {w_path}: vera_lambda_d {tuple(lam_d.shape)} and vera_lambda_b "
                             f"{tuple(lam_b.shape)} do not fit r={r} and matrices up to out={vera_B.shape[0]}.")
        modules[name] = (lam_b, lam_d)
    if not modules:
        raise InputError(f"{w_path} holds no VeRA vectors.")
    return VeRAAdapter(modules, vera_A, vera_B, int(cfg.get("projection_prng_key", 0)),
                       float(cfg.get("d_initial", D_INITIAL)), float(cfg.get("vera_dropout") or 0.0),
                       cfg.get("base_model_name_or_path"), cfg.get("target_modules"), parse_record(metadata, w_path))


def _check_vera_config(cfg: dict, path: Path) -> None:
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "VERA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise InputError(f"{path} has peft_type {got!r}, not 'VERA'; a VeRA run resumes from and reads VeRA adapters "
                         "only (a LoRA adapter goes to lora.variant lora/dora).")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InputError(f"{path} lacks a positive integer 'r' field, got {r!r}.")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{path} has bias={cfg['bias']!r}; qlora supports bias='none' only.")
    for key in ("fan_in_fan_out", "modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            raise InputError(f"{path} sets {key}={cfg[key]!r}, which qlora does not support for VeRA; leave it unset.")
    if cfg.get("save_projection") is False:
        raise InputError(f"{path} has save_projection false: the file lacks the shared VeRA matrices, which qlora "
                         "does not regenerate. Save it again with save_projection true.")


def as_lora(adapter: VeRAAdapter) -> Adapter:
    """The exactly equal LoRA adapter: ``A' = d ⊙ A``, ``B' = b ⊙ B[:out]``, alpha = r (scale 1), float32.

    The file does not record each layer's input width, so ``A'`` keeps the shared width ``max_in``
    (``ModuleAdapter.wide_A``): installing it takes the first ``in`` columns, which is VeRA's own slice.
    Costs ``r·(max_in + out)`` float32 numbers per module.
    """
    mods = {}
    for name, (lam_b, lam_d) in adapter.modules.items():
        a = adapter.vera_A.float() * lam_d.float()[:, None]
        b = adapter.vera_B[: lam_b.shape[0]].float() * lam_b.float()[:, None]
        mods[name] = ModuleAdapter(a, b, float(adapter.rank), wide_A=True)
    log.info("VeRA adapter (r=%d, %d modules) runs as the equal LoRA with scale 1", adapter.rank, len(mods))
    return Adapter(mods, adapter.dropout, adapter.base_model_name_or_path, adapter.target_modules, adapter.base)


def install_vera(model: nn.Module, adapter: VeRAAdapter, trainable: bool = False,
                 only: Collection[str] | None = None) -> None:
    """Load ``adapter``'s vectors into the model's ``VeRALinear`` layers (``only``: those names), in place.

    The model's shared matrices must equal the file's (the same key and dtype drew them).

    Raises:
        InputError: matrices that differ from the model's, or a module the model lacks as a VeRA layer.
    """
    proj = vera_projections(model)
    if proj is None or tuple(proj.vera_A.shape) != tuple(adapter.vera_A.shape) or not torch.equal(
            proj.vera_A.float().cpu(), adapter.vera_A.float()) or not torch.equal(
            proj.vera_B.float().cpu(), adapter.vera_B.float()):
        raise InputError("The VeRA adapter's shared matrices differ from the model's; it was trained with another "
                         "projection_prng_key, rank, target set or dtype.")
    layers = dict(lora_modules(model))
    for name, (lam_b, lam_d) in adapter.modules.items():
        if only is not None and name not in only:
            continue
        layer = layers.get(name)
        if not isinstance(layer, VeRALinear):
            raise InputError(f"VeRA module {name!r} is not a VeRA layer of this model.")
        layer.load_vectors(lam_b, lam_d, trainable)


def is_vera_config(cfg: dict) -> bool:
    """True for a PEFT VeRA ``adapter_config.json`` (``peft_type: VERA``)."""
    return cfg.get("peft_type") == "VERA"
