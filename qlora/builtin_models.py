"""Built-in tiny base models, written to a local folder on first use.

``builtin:tiny-llama`` is a 4-layer, 128-hidden Llama with the byte-level BPE
tokenizer and chat template shipped in ``qlora/assets/tiny-llama``. Its
weights are drawn from transformers' own initializer with a fixed seed and
saved as an ordinary bf16 safetensors checkpoint, so everything downstream
(streaming loader, quantization, adapters, merge) runs on the same path as a
real model, with no download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from quant.errors import InputError, choices
from quant.files import atomic_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {"tiny-llama": ASSETS / "tiny-llama"}
_SEED = 1234


def cache_root() -> Path:
    """``$QLORA_CACHE`` or ``~/.cache/qlora``."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora"))


def resolve_model_dir(path: str) -> Path:
    """A local model folder for ``path``; ``builtin:NAME`` is materialized on first use.

    Raises:
        InputError: unknown builtin name or a path that does not exist.
    """
    if not path.startswith("builtin:"):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise InputError(
                f"Model path {path!r} is not a folder. Give a local Hugging Face checkpoint folder "
                "(config.json + *.safetensors) or builtin:tiny-llama; nothing is downloaded."
            )
        return p
    name = path.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise InputError(f"Unknown builtin model {name!r}; valid choices are {choices(sorted(BUILTIN_MODELS))}.")
    out = cache_root() / name
    if (out / "model.safetensors").exists():
        return out
    _materialize(BUILTIN_MODELS[name], out)
    return out


def _materialize(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # "replace": an earlier, incomplete materialization (no weights file) is swapped out
    with atomic_dir(out, existing="replace") as tmp:
        cfg = AutoConfig.from_pretrained(src)
        state = torch.random.get_rng_state()
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        torch.random.set_rng_state(state)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    log.info("wrote builtin model %s to %s (random init, seed %d)", src.name, out, _SEED)
