"""--gpu parsing: sizes in binary units, catalog names, and clear errors."""

import pytest

from memory.gpus import GIB, MIB, known_gpus, parse_gpu
from quant.errors import InputError


@pytest.mark.parametrize(
    "spec, total",
    [("24GB", 24 * GIB), ("24GiB", 24 * GIB), ("80G", 80 * GIB), ("16000MiB", 16000 * MIB),
     ("0.5TB", int(0.5 * (1 << 40))), ("40 gb", 40 * GIB)],
)
def test_sizes_are_binary(spec, total):
    assert parse_gpu(spec).total_bytes == total


def test_plain_gb_says_it_means_gib():
    assert "GiB" in parse_gpu("24GB").note
    assert "vendors" in parse_gpu("24GB").note


@pytest.mark.parametrize(
    "name, mib", [("rtx4090", 24564), ("a100-80gb", 81920), ("h100", 81559), ("T4", 15360), ("a100", 81920)]
)
def test_catalog_names(name, mib):
    assert parse_gpu(name).total_bytes == mib * MIB


def test_required_names_are_in_the_catalog():
    for name in ("rtx3090", "rtx4090", "rtx5090", "l4", "a10g", "t4", "v100-32gb", "a100-40gb", "a100-80gb", "a6000",
                 "l40s", "h100", "h200"):
        assert name in known_gpus()


@pytest.mark.parametrize("bad", ["24XB", "rtx9999", "24", "", "0GB", "-3GB"])
def test_bad_specs_raise_input_error_listing_choices(bad):
    with pytest.raises(InputError) as e:
        parse_gpu(bad)
    msg = str(e.value)
    assert repr(bad) in msg or bad.strip() in msg
    if bad not in ("0GB",):
        assert "rtx4090" in msg and "GiB" in msg


@pytest.mark.parametrize("bad, says", [
    ("0", "is zero"), ("-5", "is negative"), ("-3GB", "is negative"), ("0.5GB", "from 1 GiB to 1,024 GiB"),
    ("1000000GB", "is not the memory of one GPU"), ("2TB", "per GPU"),
])
def test_absurd_sizes_say_what_is_wrong(bad, says):
    with pytest.raises(InputError, match=says) as e:
        parse_gpu(bad)
    assert repr(bad) in str(e.value) and "rtx4090" in str(e.value)
