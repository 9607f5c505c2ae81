"""The one table of floating-point dtypes by name.

Recipes, the planner, the loaders and the adapters all name dtypes the same
way (``bfloat16``, ``float16``, ``float32``); this is where the names become
``torch.dtype`` objects and sizes. It lives in the lowest package, like
:mod:`quant.errors`, because ``memory`` and ``qlora`` reuse it.
"""

from __future__ import annotations

import torch

from .errors import InputError, choices

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in DTYPES.items()}  # bytes per element
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """``torch.bfloat16`` / ``'bf16'`` / ``'bfloat16'`` / ``'torch.bfloat16'`` -> ``torch.dtype``.

    Raises:
        InputError: not one of bfloat16, float16, float32 (``what`` names the setting in the message).
    """
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES:
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise InputError(f"Unsupported {what} {value!r}; valid choices are {choices(DTYPES)}.")
