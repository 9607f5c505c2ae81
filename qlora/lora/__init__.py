"""LoRA on a model: target selection, surgery, optimizer groups, diagnostics.

The layers themselves live in :mod:`layers` (shared with the planner);
this package puts them into a model and reads them back out.
"""

from layers import AdapterLinear, DoRALinear, LoRALinear

from .diagnostics import lora_diagnostics
from .param_groups import lora_param_groups, loraplus_param_groups
from .surgery import LoRAReport, apply_lora, lora_modules, lora_parameters, lora_report, named_lora_parameters
from .targets import resolve_targets

__all__ = [
    "AdapterLinear",
    "DoRALinear",
    "LoRALinear",
    "LoRAReport",
    "apply_lora",
    "lora_diagnostics",
    "lora_modules",
    "lora_param_groups",
    "lora_parameters",
    "lora_report",
    "loraplus_param_groups",
    "named_lora_parameters",
    "resolve_targets",
]
