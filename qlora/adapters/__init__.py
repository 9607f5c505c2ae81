"""Adapters as files and as objects: PEFT-format save/load, merging, and several adapters on one base.

Several adapters are switched (``set_active_adapter``), combined (``combine_adapters``), or routed per
row of one batch (``route_adapters``).
"""

from .files import Adapter, ModuleAdapter, load_adapter, read_adapter, save_adapter, write_adapter
from .merging import merge, merge_and_unload, merge_checkpoint, unmerge
from .multi import add_adapter, combine_adapters, disable_adapters, set_active_adapter
from .record import BaseRecord
from .routing import AdapterRouter, route_adapters

__all__ = [
    "Adapter",
    "AdapterRouter",
    "BaseRecord",
    "ModuleAdapter",
    "add_adapter",
    "combine_adapters",
    "disable_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merge_checkpoint",
    "read_adapter",
    "route_adapters",
    "save_adapter",
    "set_active_adapter",
    "unmerge",
    "write_adapter",
]
