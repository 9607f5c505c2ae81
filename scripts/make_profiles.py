"""Write memory/profiles/: the specs and activation profiles shipped with qlora, and their index.

    .venv/bin/python scripts/make_profiles.py            # everything (about 3 minutes on 2 cores)
    .venv/bin/python scripts/make_profiles.py qwen3-8b   # some catalog models (or recipes/NAME.yaml)

``<model>.json`` holds the entries :mod:`memory.cache` would write for a
catalog model at the settings ``qlora plan`` uses by default (all linears,
rank-independent, sdpa where the model has it, checkpointing, NF4 + double
quantization, on CUDA), once inside and, for a sliding-window model, once
beyond the window. ``recipe-<name>.json`` holds what planning a recipe in
``recipes/`` needs, so the first ``qlora train`` of it plans at cached
speed. ``index.json`` maps every key to its file. Entries are built exactly
as a plan builds them (into an empty temporary cache), so their keys are the
ones a plan looks up. Rerun after changing the probe, the layers, the 4-bit
layout or the installed torch/transformers: tests/memory/test_cache.py fails
until the shipped entries match the code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _fresh_caches(tmp: str) -> None:
    from memory import cache, profile, spec

    os.environ[cache.CACHE_ENV] = tmp
    for c in (cache._shipped_index, cache._shipped, spec._spec_cached, profile.body_profile, profile.hf_head_profile):
        c.cache_clear()


def _collect(tmp: str) -> dict:
    return {p.stem.partition("-")[2]: json.loads(p.read_text()) for p in sorted((Path(tmp) / "planner").glob("*.json"))}


def _model_entries(name: str) -> dict:
    """Build catalog model ``name``'s default-plan entries into an empty cache and return them by key."""
    import memory
    from memory.fit import NotPolynomial

    with tempfile.TemporaryDirectory() as tmp:
        _fresh_caches(tmp)
        model = memory.load_spec(name)
        # the default plan, and the tiled profiles a long-context plan (--seq-len auto) reads: both tiling
        # switches on (their auto), and the MLP alone (--tiled-mlp on: auto norms are planned off then on)
        shapes = [memory.Settings(), memory.Settings(tiled_mlp=True, tiled_norms=True),
                  memory.Settings(tiled_mlp=True, tiled_norms=False)]
        window = model.config.get("sliding_window")
        if window and model.config.get("use_sliding_window") is not False:
            shapes.append(memory.Settings(seq_len=window + 1))  # the dry runs past the window differ
        for settings in shapes:
            try:
                memory.estimate(model, settings)
            except NotPolynomial as e:  # reported, not shipped: such a plan fails the same way
                print(f"{name} at seq {settings.seq_len}: no profile ({e})", file=sys.stderr)
        return _collect(tmp)


def _recipe_entries(path: Path) -> dict:
    """What planning ``path`` as ``qlora train`` does here builds (its device: the recipe's, CUDA with a gpu)."""
    from qlora.train.plan import plan_recipe, planning_device
    from qlora.train.recipe import load_recipe

    recipe = load_recipe(path)
    with tempfile.TemporaryDirectory() as tmp:
        _fresh_caches(tmp)
        plan_recipe(recipe)  # the device qlora train would plan for on this machine
        if recipe.lora.dtype == "auto" and planning_device(recipe).type == "cpu":
            # on a CPU auto means bf16 or float32, by the CPU (qlora.train.precision): ship both
            for dtype in ("bfloat16", "float32"):
                plan_recipe(dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, dtype=dtype)))
        return _collect(tmp)


def _write(name: str, entries: dict, start: float) -> None:
    from memory.cache import SHIPPED_DIR
    from quant.files import write_text_atomic

    target = SHIPPED_DIR / name
    write_text_atomic(target, json.dumps({"entries": entries}, separators=(",", ":")) + "\n")
    kb = target.stat().st_size / 1024
    print(f"{name}: {len(entries)} entries, {kb:.0f} KiB, {time.perf_counter() - start:.1f} s", flush=True)


def main(names: list[str]) -> int:
    import memory
    from memory.cache import SHIPPED_DIR
    from quant.files import write_text_atomic

    recipes = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "recipes").glob("*.yaml"))]
    names = names or memory.known_models() + recipes
    SHIPPED_DIR.mkdir(exist_ok=True)
    for name in names:
        start = time.perf_counter()
        if name.endswith((".yaml", ".yml")):
            _write(f"recipe-{Path(name).stem}.json", _recipe_entries(ROOT / name), start)
        else:
            _write(f"{name}.json", _model_entries(name), start)
    index = {}
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        if path.name != "index.json":
            index.update((key, path.name) for key in json.loads(path.read_text())["entries"])
    write_text_atomic(SHIPPED_DIR / "index.json", json.dumps(index, indent=0, sort_keys=True) + "\n")
    print(f"index.json: {len(index)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
