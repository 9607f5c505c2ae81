"""What base an adapter was trained on, recorded in its weights file so a merge can default from it.

The record lives in the safetensors header metadata of
``adapter_model.safetensors`` under one key, ``qlora.base``, as a JSON object::

    {"quant_type": "nf4", "blocksize": 64, "double_quant": true, "dtype": "bfloat16"}
    {"quant_type": "none", "dtype": "bfloat16"}          # a 16-bit base (plain LoRA)

Why there and not in ``adapter_config.json``: PEFT (0.21) builds its
``LoraConfig`` from every config key and warns about unknown ones ("saved
using a higher version of the library"), while it reads the weights with
``safetensors.torch.load_file``, which ignores header metadata. So PEFT,
vLLM and every other reader load the file exactly as before. An adapter
without the key (PEFT's own, or saved by an older qlora) simply has no record.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from layers.base import base_dtype
from qlora.lora.surgery import lora_modules
from quant.errors import InputError, choices
from quant.formats import BASE_QUANT_TYPES, NO_QUANT
from quant.linear import NF4Linear

log = logging.getLogger(__name__)

METADATA_KEY = "qlora.base"


@dataclass(frozen=True)
class BaseRecord:
    """The base an adapter was trained on.

    Attributes:
        quant_type: ``nf4`` or ``fp4`` (a 4-bit base), or ``none`` (a 16-bit base).
        blocksize, double_quant: the 4-bit format (None for ``none``).
        dtype: the base's 16-bit dtype (``bfloat16``...): what a 4-bit base dequantizes to.
    """

    quant_type: str
    dtype: str
    blocksize: int | None = None
    double_quant: bool | None = None

    @property
    def quantized(self) -> bool:
        return self.quant_type != NO_QUANT

    def describe(self) -> str:
        """``an nf4 base (blocksize 64, double quant)`` or ``a 16-bit base (bfloat16)``, for messages."""
        if not self.quantized:
            return f"a 16-bit base ({self.dtype})"
        dq = "double quant" if self.double_quant else "no double quant"
        return f"an {self.quant_type} base (blocksize {self.blocksize}, {dq})"


def base_record(model: nn.Module) -> BaseRecord | None:
    """The base of ``model``'s adapters, read off its layers by type; None when it cannot be told.

    Any ``NF4Linear`` in the model makes it a 4-bit base with that layer's
    format (layers kept 16-bit next to it, such as the head, are the usual
    QLoRA layout); no ``NF4Linear`` makes it a 16-bit base. None: 4-bit
    layers in several formats, or adapters merged in memory on a model
    without 4-bit layers (their training base is set aside, so unseen).
    """
    formats = Counter(
        (m.quant_type, m.blocksize, m.double_quant, m.weight_dtype) for m in model.modules() if isinstance(m, NF4Linear)
    )
    if len({f[:3] for f in formats}) > 1:
        log.warning("the model's 4-bit layers use several formats (%s); the adapter records no base", sorted(formats))
        return None
    if formats:
        quant_type, blocksize, double_quant, dtype = formats.most_common(1)[0][0]
        return BaseRecord(quant_type, _dtype_name(dtype), blocksize, double_quant)
    adapted = [m for _, m in lora_modules(model)]
    if not adapted or any(m.merged for m in adapted):
        return None
    dtype = Counter(base_dtype(m.base_layer) for m in adapted).most_common(1)[0][0]
    return BaseRecord(NO_QUANT, _dtype_name(dtype))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def record_metadata(record: BaseRecord | None) -> dict[str, str]:
    """The safetensors metadata entries (strings only) holding ``record``; empty for None."""
    if record is None:
        return {}
    fields = {k: v for k, v in asdict(record).items() if v is not None}
    return {METADATA_KEY: json.dumps(fields, sort_keys=True)}


def parse_record(metadata: dict[str, str] | None, path: str | Path) -> BaseRecord | None:
    """The record in a weights file's metadata (``path`` names the file in errors); None without one.

    Raises:
        InputError: the ``qlora.base`` entry is not a valid record.
    """
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        record = BaseRecord(d["quant_type"], d["dtype"], d.get("blocksize"), d.get("double_quant"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} has an unreadable {METADATA_KEY!r} metadata entry {raw!r} ({e}).") from None
    four_bit_ok = isinstance(record.blocksize, int) and isinstance(record.double_quant, bool)
    if record.quant_type not in BASE_QUANT_TYPES or (record.quantized and not four_bit_ok):
        raise InputError(
            f"{path} records a base {raw}; a record names quant_type {choices(BASE_QUANT_TYPES)}, and for a 4-bit "
            "base an integer blocksize and a true/false double_quant."
        )
    return record


def common_record(
    records: Sequence[BaseRecord | None], labels: Sequence[str], verb: str = "combine"
) -> BaseRecord | None:
    """The one base recorded by adapters about to be combined (or served together: ``verb``); None when none does.

    An adapter without a record (PEFT's) says nothing about its base, so it
    does not contradict the others; it is logged.

    Raises:
        InputError: two adapters record different bases (both are named).
    """
    known = [(label, r) for label, r in zip(labels, records) if r is not None]
    if not known:
        return None
    first_label, first = known[0]
    for label, r in known[1:]:
        if r != first:
            advice = ("serve them from separate processes, each on the base it was trained on" if verb == "serve"
                      else "merge them one at a time, each into the base it was trained on")
            raise InputError(
                f"Cannot {verb} adapters trained on different bases: {first_label} was trained on "
                f"{first.describe()}, {label} on {r.describe()}; {advice}."
            )
    unknown = [label for label, r in zip(labels, records) if r is None]
    if unknown:
        log.info("%s record no base; taking %s's (%s)", ", ".join(unknown), first_label, first.describe())
    return first


def serving_format(record: BaseRecord | None, quant_type: str | None = None) -> dict:
    """How to load the base an adapter runs on: ``quant_type``/``blocksize``/``double_quant`` for the loader.

    An explicit ``quant_type`` (a command-line flag) wins; else the adapter's
    record, so an adapter runs on the base it was trained on (a 16-bit-trained
    one on the 16-bit weights); else NF4, blocksize 64, double quant, qlora's default.
    The choice and its reason are logged.
    """
    if quant_type is not None:
        if record is not None and record.quant_type != quant_type:
            log.warning("the adapter was trained on %s, but --quant-type %s was asked for: loading that instead",
                        record.describe(), quant_type)
        fmt, why = {"quant_type": quant_type}, "--quant-type"
    elif record is not None:
        fmt, why = {"quant_type": record.quant_type}, "the adapter's record of its training base"
        if record.quantized:
            fmt |= {"blocksize": record.blocksize, "double_quant": record.double_quant}
    else:
        fmt, why = {"quant_type": "nf4"}, "the default (no --quant-type, and the adapter records no base)"
    log.info("base loaded as %s: %s", fmt, why)
    return fmt
