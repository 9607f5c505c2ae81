"""``qlora quantize MODEL_DIR --out OUT_DIR``: write a bitsandbytes 4-bit copy of a 16-bit checkpoint.

The output loads with ``transformers.AutoModelForCausalLM.from_pretrained``
(bitsandbytes 4-bit) and with ``quant.load_quantized_model``. The work is
streamed tensor by tensor (see ``quant.streaming``), so the source model is
never held in memory.
"""

from __future__ import annotations

import sys


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Quantize a local Hugging Face checkpoint (config.json + *.safetensors) to NF4/FP4 with "
        "double-quantized scales, in the transformers/bitsandbytes pre-quantized layout.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="16-bit checkpoint directory, a .gguf file, or builtin:NAME")
    p.add_argument(
        "--out", required=True, metavar="OUT_DIR", help="output directory (must be absent or empty unless --overwrite)",
    )
    p.add_argument("--quant-type", default="nf4", metavar="{nf4,fp4}", help="4-bit code (default nf4)")
    p.add_argument(
        "--blocksize", default="64", metavar="N", help="values per absmax block: 32..4096, powers of two (default 64)",
    )
    p.add_argument(
        "--no-double-quant", action="store_true",
        help="keep float32 absmax (4.5 bits/param at blocksize 64 instead of 4.127)",
    )
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="NAME",
        help="extra linear layers to keep 16-bit (name, suffix or regex); lm_head always is",
    )
    p.add_argument(
        "--dtype", default=None, metavar="DTYPE",
        help="dtype of unquantized tensors: bfloat16, float16 or float32 (default: config.json's, else bfloat16)",
    )
    p.add_argument(
        "--compute-dtype", default="bfloat16", metavar="DTYPE",
        help="bnb_4bit_compute_dtype recorded for loaders (default bfloat16)",
    )
    p.add_argument("--device", default="cpu", help="where to quantize: cpu (default) or cuda")
    p.add_argument(
        "--max-shard-size", default="2GB", metavar="SIZE",
        help="split output files above this size (default 2GB; also caps host memory)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT_DIR (only after the new one is complete)",
    )


def run(args) -> int:
    from tqdm import tqdm

    from qlora.builtin_models import resolve_model_dir
    from quant import DEFAULT_SKIP, InputError, quantize_checkpoint

    try:
        blocksize = int(args.blocksize)
    except ValueError:
        raise InputError(
            f"Unsupported blocksize {args.blocksize!r}: it must be an integer, "
            "one of 32, 64, 128, 256, 512, 1024, 2048 or 4096."
        ) from None
    bar = tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="quantizing", file=sys.stderr, disable=None,
        leave=False,
    )

    def progress(done: int, total: int, key: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(key[-40:], refresh=False)
        bar.refresh()

    try:
        report = quantize_checkpoint(
            str(resolve_model_dir(args.model_dir)), args.out, quant_type=args.quant_type, blocksize=blocksize,
            double_quant=not args.no_double_quant, compute_dtype=args.compute_dtype,
            skip=tuple(DEFAULT_SKIP) + tuple(args.skip), dtype=args.dtype, device=args.device,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=progress,
        )
    finally:
        bar.close()
    fmt = f"{report.quant_type}{' + double quant' if report.double_quant else ''}, blocksize {report.blocksize}"
    print(f"wrote {report.out_dir} ({', '.join(report.files)}; {fmt})")
    rows = [
        ("", "params", "before", "after", "bits/param"),
        ("4-bit linears", f"{report.params_quantized:,}", _size(report.bytes_quantized_before),
         _size(report.bytes_quantized_after), f"{report.bits_quantized:.3f}"),
        ("whole model", f"{report.params_total:,}", _size(report.bytes_total_before), _size(report.bytes_total_after),
         f"{report.bits_total:.3f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  " + r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:])))
    print(
        f"  {report.n_quantized} matrices quantized; their code tables and quant-state JSON add "
        f"{_size(report.bytes_tables)} (counted in the whole-model figure). "
        f"Format rate: {report.bits_format:.3f} bits/param."
    )
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
