"""Trainer checkpoints: written atomically, loaded without unpickling objects.

A checkpoint is a folder ``checkpoint-<step>`` holding
  adapter/                 the adapter in PEFT format (adapter_config.json + safetensors)
  trainer_state.pt         optimizer + scheduler state, RNG states and the step (the data
                           position is a pure function of the step and the seed: qlora.data.epoch_order)
  recipe.yaml              the resolved recipe
It is assembled under a temporary name and renamed into place, so a crash at
any moment leaves either the complete folder or nothing; only complete
folders carry the ``COMPLETE`` marker that :func:`latest_checkpoint` requires.
``trainer_state.pt`` holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import safe_open

from quant.errors import InputError
from quant.files import atomic_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"

# What a re-run may change and still resume: how long it runs (the schedule is recomputed over the new
# length), how often it evaluates, saves and logs, what it scores, and where it runs. Every other key
# changes what the saved adapter, optimizer state or data position mean, so a change is refused.
RESUMABLE_KEYS = ("max_steps", "epochs", "eval_steps", "save_steps", "keep_checkpoints", "log_steps",
                  "diagnostics_steps", "task", "output_dir", "device", "gpu", "distributed.timeout_s",
                  "distributed.backend")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_adapter: Callable[[Path], None],
    trainer_state: dict,
    recipe: dict,
    keep: int = 2,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and prune to the newest ``keep``.

    Args:
        write_adapter: writes the PEFT-format adapter into the folder it is given.
        trainer_state: tensors and plain containers only (checked on load).
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step:07d}"
    # "replace": the same step saved twice (a signal right after a periodic save) swaps in the new folder
    with atomic_dir(final, existing="replace") as tmp:
        write_adapter(tmp / "adapter")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / MARKER).write_text(str(step))
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(out)  # leftovers of a killed earlier run
    log.info("saved checkpoint %s", final)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and (p / MARKER).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None.

    First cleans up after a killed writer (:func:`quant.files.remove_stale_temporaries`):
    a checkpoint set aside while the same step was being saved again is put
    back under its name, so a kill at that moment does not lose it.
    """
    remove_stale_temporaries(output_dir)
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def check_output_dir(out: Path) -> None:
    """Refuse an ``output_dir`` that is a file or cannot be written, before anything is loaded.

    Raises:
        InputError: naming the path and what is wrong with it.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {str(out)!r} is a file, not a folder; give a folder (it is created if missing).")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output_dir {str(out)!r} cannot be written: {str(existing)!r} is read-only or protected. "
                         "Choose a folder you can write to.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("rank_pattern", "alpha_pattern"):  # patterns compare whole
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)


def check_resumable(ckpt: str | Path, saved: dict, recipe: dict) -> None:
    """Refuse to resume ``ckpt`` with a resolved recipe that differs from the one it was saved with.

    ``saved`` is the checkpoint's ``recipe.yaml`` (from :func:`open_checkpoint`); ``recipe`` is the re-run's
    resolved recipe (:func:`qlora.train.recipe.recipe_to_dict`, after the plan filled in its ``auto`` values),
    compared key by key; keys under :data:`RESUMABLE_KEYS` may differ. A key only one side has (a recipe of
    another qlora version) is logged, not refused.

    Raises:
        InputError: each changed key with its old and new value, the keys that may change, and how to
            start a fresh run instead.
    """
    path = Path(ckpt) / "recipe.yaml"
    old, new = _flat(saved), _flat(recipe)
    changed = [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k] and not _may_change(k)]
    only = sorted(set(old) ^ set(new))
    if only:
        log.info("%s and this recipe do not share the keys %s (another qlora version); not compared", path, only)
    if changed:
        out = Path(ckpt).parent
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise InputError(
            f"{out} holds a run started with another recipe, and resuming it would mix the two. Changed: {listed}. "
            f"A re-run may change only {', '.join(RESUMABLE_KEYS)}. To resume, undo the changes (the run's recipe "
            f"is {path}); to train with them, start a fresh run in another output_dir (or delete {out})."
        )


def _read(ckpt: Path) -> tuple[dict, dict]:
    """The checkpoint's recipe and trainer state, after a look at each adapter file's header (a truncated
    safetensors file fails there, before any model is built). Raises whatever the readers raise."""
    saved = yaml.safe_load((ckpt / "recipe.yaml").read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
        raise ValueError("recipe.yaml does not hold a mapping")
    weights = sorted((ckpt / "adapter").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(2, "no adapter weights", str(ckpt / "adapter" / "adapter_model.safetensors"))
    for w in weights:
        with safe_open(str(w), "pt"):  # reads only the header, which checks the file's length
            pass
    return saved, torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)


def _why(e: Exception) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{Path(e.filename).name} is missing"
    return f"{type(e).__name__}: {e}"


def open_checkpoint(ckpt: str | Path) -> tuple[dict, dict]:
    """Read a checkpoint to resume: its ``recipe.yaml`` and its ``trainer_state.pt`` (``weights_only=True``).

    Returns:
        ``(saved_recipe, trainer_state)``.

    Raises:
        InputError: a checkpoint with a missing, truncated or unreadable file (its ``COMPLETE`` marker says
            it was written whole, so something damaged it since), naming the file, the newest earlier
            checkpoint that reads whole and the command that resumes from it. Nothing is moved or deleted.
    """
    ckpt = Path(ckpt)
    try:
        return _read(ckpt)
    except Exception as e:  # any reader's failure is the same fact for the user: this folder is damaged
        why = _why(e)
    earlier = None
    for older in reversed([c for c in list_checkpoints(ckpt.parent) if c.name < ckpt.name]):
        try:
            _read(older)
        except Exception as e:
            log.info("%s cannot be resumed either (%s)", older, _why(e))
            continue
        earlier = older
        break
    aside = f"mv {ckpt} {ckpt.parent / ('damaged-' + ckpt.name)}"
    if earlier is None:
        then = (f"No earlier checkpoint reads whole, so the run must start over: move {ckpt.parent} aside "
                "(or delete it) and run the same command again.")
    else:
        then = (f"The newest complete earlier checkpoint is {earlier.name} (step {int(_NAME.match(earlier.name)[1])}): "
                f"to resume from it, move the damaged one aside ({aside}) and run the same command again.")
    raise InputError(f"The newest checkpoint {str(ckpt)!r} is damaged and cannot be resumed: {why}. {then}")
