"""Library progress bars off while qlora works: one context manager for datasets' and transformers'.

Reading a data file ("Generating train split") or converting a GGUF file once ("Converting and
de-quantizing GGUF tensors", "Loading weights", "Writing model shards") draws bars that say nothing
the trainer's own lines do not, and written to a log file their carriage returns run into one line.
The caller's settings come back on exit, so a script that wants the bars elsewhere keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """Turn datasets' and transformers' progress bars off inside the block; restore each one's setting."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_off, hf_on = datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_off:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()
