"""GPU memory budgets: a catalog of common cards and a parser for sizes.

``--gpu`` takes either a catalog name (``rtx4090``, ``a100-80gb``, ``h100``...)
or a size (``24GB``, ``24GiB``, ``80G``, ``16000MiB``).

Units: GPU vendors print binary sizes with decimal names. A "24 GB" RTX 4090
has 24 GiB of memory (the driver reports 24,564 MiB of it), so a plain
``GB``/``G`` here means GiB (2**30 bytes), as do ``MB``/``M`` (MiB) and
``TB``/``T`` (TiB). The planner says so in its output.

Catalog sizes are the total the driver reports (``nvidia-smi``,
``torch.cuda.mem_get_info()[1]``), which is a little less than the marketing
size on cards with ECC enabled (T4, A10G, L4): the planner budgets against
what a process can actually get.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quant.errors import InputError, choices

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    """A memory budget.

    Attributes:
        name: catalog name, or the size as the user wrote it.
        total_bytes: memory the driver reports for the whole device.
        marketed: the vendor's label (``"24 GB"``), for display.
        note: where the number comes from / how the input was read.
    """

    name: str
    total_bytes: int
    marketed: str
    note: str = ""

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def _mib(n: int) -> int:
    return n * MIB


# name -> (driver-reported total in MiB, marketing label). Totals are what
# nvidia-smi typically prints for the card with its default ECC setting;
# a different VBIOS or ECC mode moves them by a few MiB, which the safety
# margin absorbs.
_CATALOG: dict[str, tuple[int, str]] = {
    "t4": (15_360, "16 GB"),
    "v100-16gb": (16_384, "16 GB"),
    "v100-32gb": (32_768, "32 GB"),
    "rtx3060": (12_288, "12 GB"),
    "rtx3080": (10_240, "10 GB"),
    "rtx3090": (24_576, "24 GB"),
    "rtx4080": (16_376, "16 GB"),
    "rtx4090": (24_564, "24 GB"),
    "rtx5090": (32_607, "32 GB"),
    "a10g": (23_028, "24 GB"),
    "a10": (23_028, "24 GB"),
    "l4": (23_034, "24 GB"),
    "a5000": (24_564, "24 GB"),
    "a6000": (49_140, "48 GB"),
    "rtx6000-ada": (49_140, "48 GB"),
    "l40": (46_068, "48 GB"),
    "l40s": (46_068, "48 GB"),
    "a100-40gb": (40_960, "40 GB"),
    "a100-80gb": (81_920, "80 GB"),
    "h100": (81_559, "80 GB"),
    "h100-nvl": (95_830, "94 GB"),
    "h200": (143_771, "141 GB"),
}

_ALIASES = {
    "a100": "a100-80gb",
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "h100-pcie": "h100",
    "v100": "v100-32gb",
    "rtx-a6000": "a6000",
    "3090": "rtx3090",
    "4090": "rtx4090",
    "5090": "rtx5090",
}

_UNITS = {
    "": None,
    "g": GIB, "gb": GIB, "gib": GIB,
    "m": MIB, "mb": MIB, "mib": MIB,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# A size outside this range is a typo, not a GPU: the smallest card qlora can train on holds the CUDA
# context (~0.5 GiB) and a model; the largest single GPU today has 288 GB (B300, MI355X).
GPU_SIZE_RANGE = (1 * GIB, 1 << 40)


def known_gpus() -> list[str]:
    """Catalog names, sorted by memory then name."""
    return sorted(_CATALOG, key=lambda k: (_CATALOG[k][0], k))


def catalog_gpu(name: str) -> GPU:
    """The catalog entry for ``name`` (case-insensitive, aliases accepted).

    Raises:
        InputError: ``name`` is not in the catalog.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _CATALOG:
        raise InputError(_unknown_message(name))
    mib, label = _CATALOG[key]
    return GPU(key, _mib(mib), label, f"{label} card; the driver reports {mib:,} MiB")


def parse_size(spec: str, what: str = "--gpu", help_: str = "") -> int:
    """Bytes of a size such as ``24GB``, ``80G`` or ``16000MiB`` (``GB``/``G``/``GiB`` = 2**30, see the module).

    Raises:
        InputError: not a number with a unit, an unknown unit, no unit, zero or negative.
    """
    help_ = help_ or "Write a number with a unit: GB, GiB, G, MB, MiB, M, TB, TiB or T (e.g. '24GB', '16000MiB')."
    m = _SIZE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise InputError(f"{what} {spec!r} is not a size. {help_}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise InputError(f"{what} {spec!r} has an unknown unit {m.group(2)!r}. {help_}")
    if value <= 0:
        raise InputError(f"{what} {spec!r} is {'zero' if value == 0 else 'negative'}; give a positive size. {help_}")
    if _UNITS[unit] is None:
        raise InputError(
            f"{what} {spec!r} has no unit; write e.g. '{m.group(1)}GB' (GiB) or '{m.group(1)}MiB'. {help_}"
        )
    return int(value * _UNITS[unit])


def parse_gpu(spec: str) -> GPU:
    """A :class:`GPU` from a catalog name or a size such as ``24GB``.

    ``GB``, ``G``, ``GiB`` all mean 2**30 bytes (vendor "GB" on GPUs are
    binary); ``MB``/``MiB``/``M`` mean 2**20 and ``TB``/``TiB``/``T`` 2**40.

    Raises:
        InputError: unknown name, unknown unit (``24XB``), no unit, or a
            size that is not positive or outside :data:`GPU_SIZE_RANGE`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--gpu needs a GPU name or a memory size, got {spec!r}. " + _help())
    if _SIZE.match(spec) is None:
        return catalog_gpu(spec)
    total = parse_size(spec, "GPU size", _help())
    lo, hi = GPU_SIZE_RANGE
    if not lo <= total <= hi:
        raise InputError(
            f"GPU size {spec!r} ({total / GIB:,.2f} GiB) is not the memory of one GPU: give a size from "
            f"{lo / GIB:.0f} GiB to {hi / GIB:,.0f} GiB (per GPU), e.g. '24GB', or a GPU name: {choices(known_gpus())}."
        )
    binary = _SIZE.match(spec).group(2).lower() in ("gib", "mib", "tib")
    note = (
        f"{spec.strip()} read as {total / GIB:.2f} GiB"
        + ("" if binary else " (GPU vendors' 'GB' are GiB: a 24 GB card has 24 GiB)")
    )
    return GPU(spec.strip(), total, spec.strip(), note)


def _help() -> str:
    return (
        "Valid: a size with unit GB, GiB, G, MB, MiB, M, TB, TiB or T (e.g. '24GB', '80G', '16000MiB'), "
        f"or a GPU name: {choices(known_gpus())}."
    )


def _unknown_message(name: str) -> str:
    return f"Unknown GPU {name!r}. " + _help()
