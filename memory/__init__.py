"""memory: predict a QLoRA run's GPU footprint before loading anything, and fit it to a GPU."""
