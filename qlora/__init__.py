"""qlora: peft-free LoRA on a frozen 4-bit base, its files, and the trainer."""

__version__ = "0.1.0"
