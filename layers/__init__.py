"""layers: the trainable adapter layers themselves, torch-only.

``LoRALinear``, ``DoRALinear`` and ``VeRALinear`` wrap a frozen base linear
layer -- an ``nn.Linear`` or a ``quant.NF4Linear`` -- and add a small trainable
update. All derive from ``AdapterLinear`` (:mod:`layers.base`), which owns the
operations on an adapter layer (install, clear, merge, enable, LoRA-FA);
the variants do not import each other, except ``DeltaLoRALinear`` (:mod:`layers.delta`),
which is a ``LoRALinear`` with another forward, and ``RoutedLinear`` (:mod:`layers.routed`),
which serves several frozen LoRA/DoRA layers to the rows of one batch. The package lives below both
``memory`` and ``qlora``, so the planner's meta-device dry runs execute
exactly the code the trainer runs while ``memory`` never imports ``qlora``.
Depends on torch and :mod:`quant.errors` only.
"""

from .adalora import AdaLoRALinear
from .base import INITS, AdapterLinear, LoRAFactor, base_dtype, base_weight, dense_linear, module_device
from .delta import DeltaLoRALinear
from .dora import DoRALinear
from .lora import LoRALinear
from .routed import RoutedLinear
from .vera import VeRALinear, VeRAProjections

__all__ = [
    "AdaLoRALinear",
    "INITS",
    "AdapterLinear",
    "DeltaLoRALinear",
    "DoRALinear",
    "LoRAFactor",
    "LoRALinear",
    "RoutedLinear",
    "VeRALinear",
    "VeRAProjections",
    "base_dtype",
    "base_weight",
    "dense_linear",
    "module_device",
]
