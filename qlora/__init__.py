"""qlora: peft-free LoRA on a frozen 4-bit base, its files, and the trainer."""

__version__ = "0.1.0"

# LoRA core public API, imported lazily (PEP 562) so that `import qlora` (and
# so `qlora plan`) does not pay for importing torch.
_LORA_API = {
    "LoRALinear": "qlora.lora",
    "apply_lora": "qlora.surgery",
    "lora_modules": "qlora.surgery",
    "lora_parameters": "qlora.surgery",
    "named_lora_parameters": "qlora.surgery",
    "lora_report": "qlora.surgery",
    "LoRAReport": "qlora.surgery",
    "resolve_targets": "qlora.targets",
    "save_adapter": "qlora.adapter_io",
    "load_adapter": "qlora.adapter_io",
    "read_adapter": "qlora.adapter_io",
    "write_adapter": "qlora.adapter_io",
    "Adapter": "qlora.adapter_io",
    "merge": "qlora.merging",
    "unmerge": "qlora.merging",
    "merge_and_unload": "qlora.merging",
    "merge_checkpoint": "qlora.merging",
    "add_adapter": "qlora.multi_adapter",
    "set_active_adapter": "qlora.multi_adapter",
    "combine_adapters": "qlora.multi_adapter",
    "disable_adapters": "qlora.multi_adapter",
    "lora_diagnostics": "qlora.diagnostics",
    "lora_param_groups": "qlora.param_groups",
    "loraplus_param_groups": "qlora.param_groups",
}


def __getattr__(name):
    if name in _LORA_API:
        import importlib

        return getattr(importlib.import_module(_LORA_API[name]), name)
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")
