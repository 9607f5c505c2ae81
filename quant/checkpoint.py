"""Read a local Hugging Face checkpoint directory, one tensor at a time.

A checkpoint directory holds ``config.json`` plus either one
``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. :class:`Checkpoint` validates the directory,
maps every tensor key to its file, and reads tensors individually.

Why the file is reopened for every read: safetensors memory-maps the file,
and every page a read touches stays in the process's resident set until the
mapping is closed. Keeping one handle open while streaming a 16 GB shard would
show a 16 GB RSS (reclaimable page cache, but counted, and what the OOM killer
and a user's ``top`` see). Reopening costs one header parse per tensor
(well under a millisecond for a typical 30 KB header) and keeps the resident
set near one tensor.

The same class parses the bitsandbytes pre-quantized layout: per 4-bit
weight, ``weight`` (packed uint8), ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map`` and
``weight.quant_state.bitsandbytes__<nf4|fp4>`` (UTF-8 JSON in a uint8 tensor).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ._codebook import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, code4
from .blockwise import QuantState4bit
from .dtypes import parse_dtype
from .errors import InputError, choices

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
# Companion keys of a bnb 4-bit weight, relative to the module prefix.
BNB_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map") + tuple(
    QUANT_STATE_KEY + q for q in QUANT_TYPES
)

# safetensors dtype tags -> torch dtypes (only what checkpoints of causal LMs use).
_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
class Checkpoint:
    """A validated checkpoint directory with a key -> file map.

    Attributes:
        path: the directory.
        config: the parsed ``config.json`` (a dict; not a transformers object).
        files: the safetensors files, in index order.
        weight_map: tensor key -> file name.

    Raises:
        InputError: the directory is missing, has no ``config.json`` or no
            safetensors weights, the index names a missing shard, or a file
            is not valid safetensors.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise InputError(
                f"Model directory {str(self.path)!r} does not exist; pass a local Hugging Face checkpoint directory "
                "(config.json plus *.safetensors)."
            )
        if not self.path.is_dir():
            raise InputError(
                f"{str(self.path)!r} is a file, not a model directory; pass the directory that holds config.json "
                "and the *.safetensors weights."
            )
        self.config = self._read_config()
        self.weight_map = self._read_weight_map()
        self.files = list(dict.fromkeys(self.weight_map.values()))
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in self.files:
            self._scan(name)

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            present = sorted(p.name for p in self.path.iterdir())[:5]
            raise InputError(
                f"{str(self.path)!r} is not a Hugging Face model directory: it has no config.json "
                f"(it contains {present or 'nothing'}). "
                "Pass the directory written by save_pretrained or downloaded from the Hub."
            )
        try:
            out = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(
                f"{str(cfg)!r} is not valid JSON ({e}); the checkpoint's config.json is corrupt."
            ) from None
        if not isinstance(out, dict) or "model_type" not in out:
            raise InputError(f"{str(cfg)!r} has no 'model_type'; it is not a transformers model config.")
        return out

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(
                    f"{str(index)!r} is not a valid safetensors index (no readable 'weight_map': {e})."
                ) from None
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise InputError(
                    f"{str(index)!r} lists shard(s) {missing[:3]} that are not in the directory; "
                    "the download is incomplete."
                )
            return dict(wm)
        # A lone model.safetensors wins over other safetensors files (an
        # adapter_model.safetensors next to it is not part of the base model).
        single = self.path / SINGLE_NAME
        files = [SINGLE_NAME] if single.is_file() else sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            hint = (
                f" It only has PyTorch pickle weights ({bins[:3]}); qlora reads safetensors only (load and re-save "
                f"with transformers' save_pretrained to convert)." if bins else ""
            )
            raise InputError(f"{str(self.path)!r} has config.json but no *.safetensors weights.{hint}")
        wm: dict[str, str] = {}
        for name in files:
            with self._open(name) as f:
                for key in f.keys():
                    if key in wm:
                        raise InputError(
                            f"Tensor {key!r} appears in both {wm[key]!r} and {name!r}; "
                            "the directory mixes two checkpoints."
                        )
                    wm[key] = name
        return wm

    def _open(self, name: str):
        try:
            return safe_open(str(self.path / name), framework="pt")
        except (SafetensorError, OSError) as e:
            raise InputError(
                f"{str(self.path / name)!r} is not a readable safetensors file ({e}); "
                "the checkpoint is corrupt or truncated."
            ) from None

    def _scan(self, name: str) -> None:
        with self._open(name) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tag = sl.get_dtype()
                if tag not in _ST_DTYPES:
                    raise InputError(
                        f"Tensor {key!r} in {name!r} has dtype {tag!r}, which qlora does not read; "
                        f"valid dtypes are {sorted(_ST_DTYPES)}."
                    )
                self._info[key] = (_ST_DTYPES[tag], tuple(sl.get_shape()))
        absent = [k for k, v in self.weight_map.items() if v == name and k not in self._info]
        if absent:
            raise InputError(f"The index maps {absent[:3]} to {name!r}, but that file does not contain them.")

    # ---- queries -------------------------------------------------------

    def keys(self) -> list[str]:
        """All tensor keys, grouped by file (the order reads are cheapest in)."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.weight_map, key=lambda k: order[self.weight_map[k]])

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def numel(self, key: str) -> int:
        n = 1
        for d in self._info[key][1]:
            n *= d
        return n

    def nbytes(self, key: str) -> int:
        return self.numel(key) * self._info[key][0].itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into host memory (the file mapping is closed again)."""
        return self.get_many([key])[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read several tensors, opening each file once for the group."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in self.weight_map:
                raise InputError(f"Tensor {k!r} is not in the checkpoint {str(self.path)!r}.")
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with self._open(name) as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out

    # ---- bitsandbytes pre-quantized layout -------------------------------

    @property
    def quantization_config(self) -> dict | None:
        """The bitsandbytes 4-bit ``quantization_config``, or None for a 16-bit checkpoint.

        Raises:
            InputError: the checkpoint is quantized with another method.
        """
        qc = self.config.get("quantization_config")
        if qc is None:
            return None
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            what = f"quant_method {method!r}" + (" in 8-bit mode" if method == "bitsandbytes" else "")
            raise InputError(
                f"{str(self.path)!r} is quantized with {what}; qlora loads 16-bit checkpoints and bitsandbytes "
                f"4-bit ('-bnb-4bit') checkpoints only."
            )
        return qc

    def bnb_modules(self) -> list[str]:
        """Module prefixes (``'model.layers.0.mlp.up_proj.'``) that carry 4-bit companions."""
        out = []
        for key in self.weight_map:
            for suffix in BNB_SUFFIXES:
                if key.endswith("." + suffix):
                    out.append(key[: -len(suffix)])
                    break
        return sorted(set(out))

    def read_bnb_weight(self, prefix: str) -> tuple[torch.Tensor, QuantState4bit]:
        """Read and validate one pre-quantized weight.

        Args:
            prefix: module prefix with a trailing dot, e.g. ``'model.layers.0.mlp.up_proj.'``.

        Returns:
            ``(packed uint8 ((n+1)//2, 1), state)`` on the host.

        Raises:
            InputError: a missing, corrupt or inconsistent entry; the message names the tensor key.
        """
        qs_keys = [prefix + QUANT_STATE_KEY + q for q in QUANT_TYPES if prefix + QUANT_STATE_KEY + q in self]
        if not qs_keys:
            raise InputError(
                f"The 4-bit weight {prefix + 'weight'!r} has no quant-state entry: expected "
                f"{prefix + QUANT_STATE_KEY + 'nf4'!r} (or __fp4). "
                "The checkpoint is incomplete or was not written by bitsandbytes."
            )
        qs_key = qs_keys[0]
        meta = _parse_quant_state(self.get(qs_key), qs_key)
        qt = qs_key.rsplit("__", 1)[1]
        if meta["quant_type"] != qt:
            raise InputError(
                f"{qs_key!r} says quant_type {meta['quant_type']!r} but its key says {qt!r}; the entry is corrupt."
            )
        nested = "nested_offset" in meta
        need = ["weight", "weight.absmax", "weight.quant_map"] + (
            ["weight.nested_absmax", "weight.nested_quant_map"] if nested else []
        )
        for suffix in need:
            if prefix + suffix not in self:
                raise InputError(
                    f"The 4-bit weight {prefix + 'weight'!r} is missing its {prefix + suffix!r} tensor; "
                    "the checkpoint is incomplete."
                )
        t = self.get_many(prefix + s for s in need)
        shape, n = meta["shape"], meta["shape"][0] * meta["shape"][1]
        n_blocks = -(-n // meta["blocksize"])
        packed = _as_packed(t[prefix + "weight"], prefix + "weight", n)
        _expect(t, prefix + "weight.quant_map", torch.float32, 16)
        if not torch.equal(t[prefix + "weight.quant_map"], code4(qt)):
            raise InputError(
                f"{prefix + 'weight.quant_map'!r} is not the standard {qt} code table; "
                "custom 4-bit codebooks are not supported."
            )
        state = QuantState4bit(
            absmax=_expect(t, prefix + "weight.absmax", torch.uint8 if nested else torch.float32, n_blocks),
            shape=torch.Size(shape), dtype=meta["dtype"], blocksize=meta["blocksize"], quant_type=qt,
        )
        if nested:
            state.nested_absmax = _expect(
                t, prefix + "weight.nested_absmax", torch.float32, -(-n_blocks // NESTED_BLOCKSIZE)
            )
            state.nested_code = _expect(t, prefix + "weight.nested_quant_map", torch.float32, 256)
            state.offset = torch.tensor(meta["nested_offset"], dtype=torch.float32)
        return packed, state


def _parse_quant_state(raw: torch.Tensor, key: str) -> dict:
    """Decode and validate the JSON quant-state entry (a uint8 tensor of UTF-8)."""
    bad = f"The quant-state entry {key!r} is corrupt"
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise InputError(f"{bad}: expected a 1-D uint8 tensor of JSON bytes, got {raw.dtype} {tuple(raw.shape)}.")
    try:
        meta = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{bad}: it is not UTF-8 JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise InputError(f"{bad}: expected a JSON object, got {type(meta).__name__}.")
    missing = [f for f in ("quant_type", "blocksize", "dtype", "shape") if f not in meta]
    if missing:
        raise InputError(f"{bad}: it lacks the field(s) {missing}.")
    if meta["quant_type"] not in QUANT_TYPES:
        raise InputError(f"{bad}: quant_type {meta['quant_type']!r} is not {choices(QUANT_TYPES)}.")
    if meta["blocksize"] not in BLOCKSIZES:
        raise InputError(f"{bad}: blocksize {meta['blocksize']!r} is not one of {choices(BLOCKSIZES)}.")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise InputError(f"{bad}: shape {shape!r} is not [out_features, in_features].")
    meta["dtype"] = parse_dtype(str(meta["dtype"]), what=f"dtype in {key!r}")
    if "nested_offset" in meta or "nested_blocksize" in meta:
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or not isinstance(meta.get("nested_offset"), (int, float)):
            raise InputError(
                f"{bad}: nested_blocksize {meta.get('nested_blocksize')!r} / "
                f"nested_offset {meta.get('nested_offset')!r} are not a blocksize of {NESTED_BLOCKSIZE} and a number."
            )
    return meta


def _as_packed(t: torch.Tensor, key: str, n: int) -> torch.Tensor:
    """The packed codes as uint8 ((n+1)//2, 1), also when stored in another quant_storage dtype."""
    want = (n + 1) // 2
    if t.dtype not in _STORAGE_DTYPES or t.numel() * t.dtype.itemsize != want:
        raise InputError(
            f"{key!r} holds {t.numel()} {t.dtype} values but its quant state's shape needs {want} packed bytes "
            f"(uint8, or a bnb_4bit_quant_storage dtype); the checkpoint is corrupt."
        )
    # bnb_4bit_quant_storage may be bf16/fp16/fp32 (used with FSDP): the bytes are the same codes.
    return t.contiguous().reshape(-1).view(torch.uint8).reshape(want, 1)


_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


def _expect(t: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    x = t[key]
    if x.dtype != dtype or x.numel() != numel:
        raise InputError(
            f"{key!r} is {x.dtype} with {x.numel()} values, but the quant state needs {dtype} with {numel}; "
            f"the checkpoint is corrupt or mixes layouts."
        )
    return x.reshape(numel)
