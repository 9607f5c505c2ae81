"""Adapters as files and as objects: PEFT-format save/load, several adapters on one base, merging."""

from .files import Adapter, ModuleAdapter, load_adapter, read_adapter, save_adapter, write_adapter
from .merging import merge, merge_and_unload, merge_checkpoint, unmerge
from .multi import add_adapter, combine_adapters, disable_adapters, set_active_adapter
from .record import BaseRecord

__all__ = [
    "Adapter",
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
    "save_adapter",
    "set_active_adapter",
    "unmerge",
    "write_adapter",
]
