"""Write memory/profiles/<model>.json: the spec and activation profiles of every catalog model, shipped.

    .venv/bin/python scripts/make_profiles.py            # every catalog model (about 3 minutes on 2 cores)
    .venv/bin/python scripts/make_profiles.py qwen3-8b   # some

Each file holds the entries :mod:`memory.cache` would write for the model at
the settings ``qlora plan`` uses by default (all linears, rank-independent,
sdpa where the model has it, checkpointing, NF4 + double quantization, on
CUDA), once inside and, for a sliding-window model, once beyond the window.
They are built here exactly as a plan builds them (into an empty temporary
cache), so their keys are the ones a plan looks up. Rerun after changing the
probe, the layers, the 4-bit layout or the installed torch/transformers:
tests/memory/test_cache.py fails until the shipped entries match the code.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _shipped_entries(name: str) -> dict:
    """Build ``name``'s default-plan entries into an empty cache and return them by key."""
    import memory
    from memory import cache, profile, spec

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[cache.CACHE_ENV] = tmp
        cache._shipped.cache_clear()
        spec._spec_cached.cache_clear()
        profile.body_profile.cache_clear()
        from memory.fit import NotPolynomial

        model = memory.load_spec(name)
        shapes = [memory.Settings()]
        window = model.config.get("sliding_window")
        if window and model.config.get("use_sliding_window") is not False:
            shapes.append(memory.Settings(seq_len=window + 1))  # the dry runs past the window differ
        for settings in shapes:
            try:
                memory.estimate(model, settings)
            except NotPolynomial as e:  # reported, not shipped: such a plan fails the same way
                print(f"{name} at seq {settings.seq_len}: no profile ({e})", file=sys.stderr)
        entries = {}
        for path in sorted((Path(tmp) / "planner").glob("*.json")):
            key = path.stem.partition("-")[2]
            entries[key] = json.loads(path.read_text())
    return entries


def main(names: list[str]) -> int:
    import memory
    from memory.cache import SHIPPED_DIR
    from quant.files import write_text_atomic

    names = names or memory.known_models()
    SHIPPED_DIR.mkdir(exist_ok=True)
    for name in names:
        start = time.perf_counter()
        target = SHIPPED_DIR / f"{name}.json"
        target.unlink(missing_ok=True)  # build, never read back, the entries being replaced
        entries = _shipped_entries(name)
        write_text_atomic(target, json.dumps({"model": name, "entries": entries}, separators=(",", ":")) + "\n")
        kb = target.stat().st_size / 1024
        print(f"{name}: {len(entries)} entries, {kb:.0f} KiB, {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
