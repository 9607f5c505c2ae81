"""qlora: peft-free LoRA on a frozen 4-bit base, its files, and the trainer."""

__version__ = "0.1.0"

# LoRA core public API, imported lazily (PEP 562) so that `import qlora` (and
# so `qlora plan`) does not pay for importing torch.
_LORA_API = {
    "LoRALinear": "layers.lora",
    "DoRALinear": "layers.dora",
    "AdapterLinear": "layers.base",
    "apply_lora": "qlora.lora.surgery",
    "lora_modules": "qlora.lora.surgery",
    "lora_parameters": "qlora.lora.surgery",
    "named_lora_parameters": "qlora.lora.surgery",
    "lora_report": "qlora.lora.surgery",
    "LoRAReport": "qlora.lora.surgery",
    "resolve_targets": "qlora.lora.targets",
    "save_adapter": "qlora.adapters.files",
    "load_adapter": "qlora.adapters.files",
    "read_adapter": "qlora.adapters.files",
    "write_adapter": "qlora.adapters.files",
    "Adapter": "qlora.adapters.files",
    "merge": "qlora.adapters.merging",
    "unmerge": "qlora.adapters.merging",
    "merge_and_unload": "qlora.adapters.merging",
    "merge_checkpoint": "qlora.adapters.merging",
    "add_adapter": "qlora.adapters.multi",
    "set_active_adapter": "qlora.adapters.multi",
    "combine_adapters": "qlora.adapters.multi",
    "disable_adapters": "qlora.adapters.multi",
    "lora_diagnostics": "qlora.lora.diagnostics",
    "lora_param_groups": "qlora.lora.param_groups",
    "loraplus_param_groups": "qlora.lora.param_groups",
}


def __getattr__(name):
    if name in _LORA_API:
        import importlib

        return getattr(importlib.import_module(_LORA_API[name]), name)
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")
