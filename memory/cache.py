"""The planner's on-disk cache: specs and fitted activation profiles, keyed by all they depend on.

Deriving a spec imports torch and transformers (about 5 s on a 2-core
machine) and fitting a profile dry-runs the model 6-15 times (2-15 s more);
evaluating either is microseconds. So both are stored as JSON, once:

* **shipped** in ``memory/profiles/`` for every catalog model at the
  settings ``qlora plan`` uses by default, and for every recipe in
  ``recipes/`` (``scripts/make_profiles.py`` writes them, with an index from
  key to file; a test checks they equal a fresh build), so the first plan of
  a catalog model, and the first ``qlora train`` of a recipe, is as fast as a
  cached one;
* **cached** under ``$QLORA_CACHE/planner/`` (default ``~/.cache/qlora``)
  for anything else, the first time it is built.

A key is the sha256 of everything the value depends on: the config facts,
the settings that change the dry run, the installed torch and transformers
versions, and the source of the code that builds it (:data:`_SOURCES`), so
editing the probe or a layer invalidates every entry. Each file stores its
key parts, checked on read. Concurrent runs are safe: a file is written
under a temporary name and renamed (:func:`quant.files.atomic_file`), so a
reader sees a whole entry or none. A corrupt or mismatched entry is ignored
and rebuilt; an unwritable cache folder costs one warning and the planner
runs without the disk cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quant.files import write_text_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "QLORA_CACHE"
SHIPPED_DIR = Path(__file__).with_name("profiles")
FORMAT = 1  # bump when the stored layout changes
_ROOT = Path(__file__).resolve().parent.parent
# The code whose behaviour a spec or a profile records: the dry run, the layers it runs, the 4-bit layout.
_SOURCES = (
    "memory/meta.py", "memory/probe.py", "memory/kernels.py", "memory/tracker.py", "memory/fit.py",
    "layers/base.py", "layers/lora.py", "layers/dora.py", "layers/vera.py", "layers/adalora.py", "layers/tiling.py",
    "quant/linear.py", "quant/blockwise.py", "quant/_codebook.py", "quant/model.py", "quant/formats.py",
)
_warned: set[str] = set()


def cache_root() -> Path:
    """``$QLORA_CACHE`` or ``~/.cache/qlora``: the folder every qlora cache lives under."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora")


@functools.cache
def code_versions() -> dict[str, str]:
    """The versions a cached value depends on: torch, transformers, and a hash of :data:`_SOURCES`."""
    digest = hashlib.sha256()
    for rel in _SOURCES:
        digest.update(rel.encode() + b"\0" + (_ROOT / rel).read_bytes() + b"\0")
    out = {"format": str(FORMAT), "code": digest.hexdigest()[:16]}
    out.update((package, _installed_version(package)) for package in ("torch", "transformers"))
    return out


def _installed_version(package: str) -> str:
    """``package``'s installed version, from its ``*.dist-info`` folder name.

    What ``importlib.metadata.version`` reads too, without its import (50 ms,
    a sixth of a cached plan); that is the fallback for other layouts.
    """
    prefix = package + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name.endswith(".dist-info"):
                return name[len(prefix) : -len(".dist-info")]
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def key_parts(kind: str, **parts: Any) -> dict[str, Any]:
    """What an entry of ``kind`` depends on: ``parts`` plus :func:`code_versions`."""
    return {"kind": kind, **parts, **code_versions()}


def key_of(parts: dict[str, Any]) -> str:
    """The sha256 (hex, 32 digits) of canonical JSON ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@functools.cache
def _shipped_index() -> dict[str, str]:
    """key -> the shipped file holding it (``memory/profiles/index.json``)."""
    try:
        index = json.loads((SHIPPED_DIR / "index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


@functools.lru_cache(maxsize=64)
def _shipped(name: str) -> dict[str, Any]:
    try:
        return json.loads((SHIPPED_DIR / name).read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _read(path: Path, parts: dict[str, Any]) -> Any | None:
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.info("planner cache: ignoring unreadable entry %s (%s); rebuilding it", path, e)
        return None
    if not isinstance(stored, dict) or stored.get("parts") != parts or "value" not in stored:
        log.info("planner cache: ignoring mismatched entry %s; rebuilding it", path)
        return None
    return stored["value"]


def _write(path: Path, parts: dict[str, Any], value: Any) -> None:
    try:
        write_text_atomic(path, json.dumps({"parts": parts, "value": value}, separators=(",", ":")))
    except Exception as e:  # noqa: BLE001  (a cache must never fail a plan: read-only home, full disk...)
        folder = str(path.parent)
        if folder not in _warned:
            _warned.add(folder)
            log.warning(
                "cannot write the planner cache in %s (%s); planning without a disk cache, so each new model or "
                "setting is rebuilt (seconds). Set %s to a writable folder to keep them.", folder, e, CACHE_ENV,
            )


def cached(kind: str, parts: dict[str, Any], build: Callable[[], Any]) -> Any:
    """The value of the entry ``(kind, parts)``: shipped, cached on disk, or built now and cached.

    Args:
        kind: ``"spec"`` or ``"profile"`` (part of the key and of the file name).
        parts: JSON-able facts the value depends on (the code versions are added here).
        build: makes the value (JSON-able) when no valid entry exists.
    """
    full = key_parts(kind, **parts)
    key = key_of(full)
    shipped = _shipped_index().get(key)
    if shipped is not None:
        entry = _shipped(shipped).get(key)
        if isinstance(entry, dict) and entry.get("parts") == full and "value" in entry:
            return entry["value"]
    path = cache_root() / "planner" / f"{kind}-{key}.json"
    value = _read(path, full)
    if value is None:
        value = build()
        _write(path, full, value)
    return value
