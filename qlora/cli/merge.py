"""``qlora merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--into dequantized|original]``.

Writes a plain 16-bit Hugging Face checkpoint (plus the base's tokenizer
files) that transformers loads without qlora or peft. Several ``--adapter``
folders with ``--weights`` are combined first (W0 + Σ wᵢ·sᵢ·BᵢAᵢ).
"""

from __future__ import annotations


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Merge a PEFT-format LoRA adapter into its base model and write a plain 16-bit checkpoint. "
        "--into dequantized (default) merges into the NF4 weights the QLoRA adapter was trained against; "
        "--into original merges into the checkpoint's 16-bit weights. docs/merging.md compares their logit error.",
    )
    p.add_argument(
        "--base", required=True, metavar="MODEL_DIR",
        help="base checkpoint folder (16-bit, or bnb 4-bit for --into dequantized)",
    )
    p.add_argument(
        "--adapter", required=True, action="append", metavar="ADAPTER_DIR",
        help="adapter folder; repeat to combine several",
    )
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, metavar="W",
        help="one weight per --adapter when combining (default 1 each)",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="new output folder (must be absent or empty)")
    p.add_argument(
        "--into", default="dequantized", choices=("dequantized", "original"),
        help="which base weights to merge into (default dequantized)",
    )
    p.add_argument(
        "--dtype", default=None, metavar="DTYPE",
        help="output dtype: bfloat16, float16 or float32 (default: the base's 16-bit dtype, else bfloat16)",
    )
    p.add_argument(
        "--quant-type", default="nf4", metavar="{nf4,fp4}",
        help="4-bit format training used (--into dequantized; default nf4)",
    )
    p.add_argument("--blocksize", type=int, default=64, metavar="N", help="4-bit blocksize training used (default 64)")
    p.add_argument(
        "--no-double-quant", action="store_true", help="training used float32 absmax (no double quantization)",
    )
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="NAME", help="extra layers training kept 16-bit (lm_head always is)",
    )
    p.add_argument("--device", default="cpu", help="where the merge math runs (default cpu)")


def run(args) -> int:
    from qlora.adapters.files import read_adapter
    from qlora.adapters.merging import merge_checkpoint
    from qlora.adapters.multi import combine_adapters
    from quant.errors import InputError

    adapters = args.adapter
    if args.weights is not None and len(args.weights) != len(adapters):
        raise InputError(
            f"--weights has {len(args.weights)} values for {len(adapters)} --adapter folders; "
            "give one weight per adapter."
        )
    if len(adapters) == 1 and args.weights is None:
        adapter = adapters[0]
    else:
        adapter = combine_adapters([read_adapter(a) for a in adapters], args.weights or [1.0] * len(adapters))
    res = merge_checkpoint(
        args.base, adapter, args.out, into=args.into, dtype=args.dtype, quant_type=args.quant_type,
        blocksize=args.blocksize, double_quant=not args.no_double_quant, skip=args.skip, device=args.device,
    )
    dtype = str(res.dtype).removeprefix("torch.")
    tok = f"; tokenizer files: {', '.join(res.tokenizer_files)}" if res.tokenizer_files else ""
    print(f"wrote {res.out_dir}: {res.merged_modules} modules merged into the {res.into} base weights, {dtype}{tok}")
    return 0
