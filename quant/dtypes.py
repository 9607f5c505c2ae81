"""The one table of floating-point dtypes by name.

Recipes, the planner, the loaders and the adapters all name dtypes the same
way (``bfloat16``, ``float16``, ``float32``); this is where the names become
sizes and ``torch.dtype`` objects. It lives in the lowest package, like
:mod:`quant.errors`, because ``memory`` and ``qlora`` reuse it. The sizes
need no torch (the planner answers without importing it); ``DTYPES`` and
``FLOAT_DTYPES`` import torch on first use.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .errors import InputError, choices

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per element, by name
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in ITEMSIZE}


def __getattr__(name: str):
    # DTYPES: name -> torch.dtype; FLOAT_DTYPES: the supported torch dtypes. Built on first use (imports torch).
    if name == "DTYPES":
        return _torch_dtypes()
    if name == "FLOAT_DTYPES":
        return tuple(_torch_dtypes().values())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """``torch.bfloat16`` / ``'bf16'`` / ``'bfloat16'`` / ``'torch.bfloat16'`` -> ``torch.dtype``.

    Raises:
        InputError: not one of bfloat16, float16, float32 (``what`` names the setting in the message).
    """
    dtypes = _torch_dtypes()
    if not isinstance(value, str) and value in dtypes.values():
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in dtypes:
            return dtypes[name]
    raise InputError(f"Unsupported {what} {value!r}; valid choices are {choices(ITEMSIZE)}.")
