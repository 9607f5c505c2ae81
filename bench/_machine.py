"""What a benchmark ran on (the device's name, the library versions) and where its results go (bench scripts)."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def device_name(device: str) -> str:
    """The GPU's name for ``cuda``, else the CPU model and its logical core count."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(*names: str) -> dict:
    """``{"python": ..., name: version}`` from installed metadata, without importing the packages."""
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def write_results(name: str, result: dict, markdown: str) -> None:
    """Write ``bench/results/<name>.json`` (``result``) and ``<name>.md`` (``markdown``), then print the markdown."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown)
    print(markdown)
