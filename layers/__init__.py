"""layers: the trainable adapter layers themselves, torch-only.

``LoRALinear`` (and its variants) wrap a frozen base linear layer -- an
``nn.Linear`` or a ``quant.NF4Linear`` -- and add a small trainable update.
They live in their own package, below both ``memory`` and ``qlora``, so
that the planner's meta-device dry runs execute exactly the code the trainer
runs while ``memory`` never imports ``qlora``. Depends on torch and
:mod:`quant.errors` only.
"""

from .dora import dora_forward, dora_merged_weight, dora_weight_norm, enable_dora
from .lora import INITS, LoRAFactor, LoRALinear, base_weight

__all__ = [
    "INITS",
    "LoRAFactor",
    "LoRALinear",
    "base_weight",
    "dora_forward",
    "dora_merged_weight",
    "dora_weight_norm",
    "enable_dora",
]
