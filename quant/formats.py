"""The 4-bit formats by name, and their storage arithmetic, without torch.

What a format *is* (its names, block sizes, and how many bytes a quantized
weight occupies) lives here, apart from the kernels, so that the memory
planner can answer from a config alone without paying torch's import (about
2.5 s on a 2-core machine). The byte counts are the sizes of
:class:`quant.NF4Linear`'s own buffers; a test checks them against a
meta-device instance for every format.
"""

from __future__ import annotations

from .errors import InputError, choices

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # second-level (double quantization) block size, fixed by the format
NO_QUANT = "none"  # the quant_type of a 16-bit base: no linear is quantized (plain LoRA)
BASE_QUANT_TYPES = QUANT_TYPES + (NO_QUANT,)
# Elements per chunk of quant.blockwise's loops: 4M float32 temporaries cost ~16 MiB per live buffer, big
# enough to amortize kernel launches, small next to any real weight. Here so the planner can price them.
QUANTIZE_CHUNK = 1 << 22
_CODE_TABLE_BYTES = 16 * 4  # the 16-entry float32 code table every 4-bit weight carries
_NESTED_TABLE_BYTES = 256 * 4  # the 256-entry float32 table of double quantization


def check_args(quant_type: str, blocksize: int) -> None:
    """Raise ``InputError`` unless (quant_type, blocksize) is a supported pair."""
    if quant_type not in QUANT_TYPES:
        raise InputError(f"Unsupported quant type {quant_type!r}; valid choices are {choices(QUANT_TYPES)}.")
    if blocksize not in BLOCKSIZES:
        raise InputError(f"Unsupported blocksize {blocksize!r}; valid choices are {choices(BLOCKSIZES)}.")


def check_base_format(quant_type: str, blocksize: int) -> None:
    """Check the base's format: ``nf4``/``fp4`` with a supported blocksize, or ``none`` (blocksize unused).

    Raises:
        InputError: an unknown quant type (naming ``nf4``, ``fp4`` and ``none``) or,
            for a 4-bit format, an unsupported blocksize.
    """
    if quant_type == NO_QUANT:
        return
    if quant_type not in QUANT_TYPES:
        raise InputError(
            f"Unsupported quant type {quant_type!r}; valid choices are {choices(BASE_QUANT_TYPES)} "
            f"({NO_QUANT!r}: a 16-bit base, plain LoRA)."
        )
    check_args(quant_type, blocksize)


def bits_per_param(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage cost of one quantized weight element, in bits.

    4 bits of code, plus the first-level scale shared by ``blocksize``
    elements (32-bit, or 8-bit with double quantization), plus the 32-bit
    second-level scale shared by ``blocksize * 256`` elements.

    >>> round(bits_per_param("nf4", 64, True), 3)
    4.127
    """
    check_args(quant_type, blocksize)
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)


def weight_bytes(in_features: int, out_features: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one quantized ``(out, in)`` weight as :class:`quant.NF4Linear` stores it.

    Packed codes (two per byte), one scale per block (uint8 with double
    quantization, else float32), the 16-entry code table, and with double
    quantization one float32 scale per 256 blocks and the float32 offset.
    Excludes the bias and the 256-entry nested table, which layers may share
    (:func:`nested_table_bytes`).
    """
    n = in_features * out_features
    blocks = -(-n // blocksize)
    size = (n + 1) // 2 + blocks * (1 if double_quant else 4) + _CODE_TABLE_BYTES
    if double_quant:
        size += 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return size


def nested_table_bytes(n_quantized: int, double_quant: bool, device: str) -> int:
    """The double-quantization code tables (256 float32 each).

    ``quant`` takes the table from one cached CPU tensor: on CPU every layer
    references that one tensor; on CUDA each layer gets its own copy.
    """
    if not double_quant or n_quantized == 0:
        return 0
    return _NESTED_TABLE_BYTES * (1 if device == "cpu" else n_quantized)
