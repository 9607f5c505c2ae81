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
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import yaml

from quant.errors import InputError
from quant.files import atomic_dir, remove_stale_temporaries

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


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


def load_trainer_state(ckpt: str | Path) -> dict:
    """Read ``trainer_state.pt`` with ``weights_only=True``.

    Raises:
        InputError: a missing or unreadable state file.
    """
    path = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(
            f"Checkpoint {str(ckpt)!r} has no trainer_state.pt; it is not a qlora trainer checkpoint."
        ) from None
    except Exception as e:
        raise InputError(f"Cannot read {str(path)!r}: {type(e).__name__}: {e}") from None
