"""quant.formats: the storage arithmetic the planner uses equals NF4Linear's own buffers; no torch needed."""

import subprocess
import sys

import pytest

from quant import NF4Linear
from quant.errors import InputError
from quant.formats import BLOCKSIZES, QUANT_TYPES, bits_per_param, check_base_format, weight_bytes


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336), (7, 13), (1000, 3), (33, 1), (576, 49152)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_bytes_equal_the_layers_buffers(shape, double_quant):
    for quant_type in QUANT_TYPES:
        for blocksize in BLOCKSIZES:
            layer = NF4Linear(*shape, False, quant_type, blocksize, double_quant, device="meta")
            buffers = sum(
                b.numel() * b.element_size() for n, b in layer.named_buffers() if n not in ("bias", "nested_quant_map")
            )
            assert weight_bytes(*shape, blocksize, double_quant) == buffers


def test_bits_per_param_and_bad_formats():
    assert round(bits_per_param("nf4", 64, True), 3) == 4.127
    assert bits_per_param("fp4", 64, False) == 4.5
    with pytest.raises(InputError, match="'nf5'.*'nf4' or 'fp4'"):
        bits_per_param("nf5")
    with pytest.raises(InputError, match="blocksize 48"):
        check_base_format("nf4", 48)
    check_base_format("none", 48)  # a 16-bit base has no blocksize


def test_the_planners_imports_need_no_torch():
    # `qlora plan` answers in well under a second only if torch (2.5 s to import) is never imported.
    code = (
        "import sys, quant.formats, quant.dtypes, quant.errors, quant.files\n"
        "from quant import InputError, bits_per_param\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
