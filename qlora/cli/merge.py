"""``qlora merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--into auto|dequantized|original]``.

Writes a plain 16-bit Hugging Face checkpoint (plus the base's tokenizer
files) that transformers loads without qlora or peft. Several ``--adapter``
folders with ``--weights`` are combined first (W0 + Σ wᵢ·sᵢ·BᵢAᵢ); they must
record the same base. ``--into auto`` follows the base the adapter records
(:func:`qlora.adapters.merging.auto_into`) and prints which it chose and why.
"""

from __future__ import annotations


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Merge a PEFT-format LoRA adapter into its base model and write a plain 16-bit checkpoint. "
        "--into dequantized merges into the NF4 weights a QLoRA adapter was trained against; --into original "
        "merges into the checkpoint's 16-bit weights; --into auto (default) picks the base the adapter records it "
        "was trained on (qlora adapters record it; one without a record merges into the original weights). "
        "docs/merging.md compares their logit error.",
    )
    p.add_argument(
        "--base", required=True, metavar="MODEL_DIR",
        help="base checkpoint folder (16-bit, or bnb 4-bit: merged into its dequantized weights), "
        "a .gguf file or builtin:NAME",
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
        "--into", default="auto", choices=("auto", "dequantized", "original"),
        help="which base weights to merge into (default auto: the base the adapter was trained on)",
    )
    p.add_argument(
        "--dtype", default=None, metavar="DTYPE",
        help="output dtype: bfloat16, float16 or float32 (default: the base's 16-bit dtype, else bfloat16)",
    )
    p.add_argument(
        "--quant-type", default=None, metavar="{nf4,fp4}",
        help="4-bit format training used, for adapters that do not record it (default: the record, else nf4)",
    )
    p.add_argument(
        "--blocksize", type=int, default=None, metavar="N",
        help="4-bit blocksize training used, for adapters that do not record it (default: the record, else 64)",
    )
    p.add_argument(
        "--no-double-quant", action="store_true",
        help="training used float32 absmax (no double quantization), for adapters that do not record it",
    )
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="NAME", help="extra layers training kept 16-bit (lm_head always is)",
    )
    p.add_argument("--device", default="cpu", help="where the merge math runs (default cpu)")


def run(args) -> int:
    from qlora.adapters.files import read_adapter
    from qlora.adapters.merging import merge_checkpoint, merge_target
    from qlora.adapters.multi import combine_adapters
    from qlora.adapters.record import common_record
    from qlora.builtin_models import resolve_model_dir
    from quant.errors import InputError

    adapters = args.adapter
    if args.weights is not None and len(args.weights) != len(adapters):
        raise InputError(
            f"--weights has {len(args.weights)} values for {len(adapters)} --adapter folders; "
            "give one weight per adapter."
        )
    read = [read_adapter(a) for a in adapters]  # validated before any weights are loaded
    if len(read) == 1 and args.weights is None:
        adapter = read[0]
    else:
        base = common_record([a.base for a in read], adapters)  # checked first: combining drops the records
        adapter = combine_adapters(read, args.weights or [1.0] * len(adapters))
        adapter.base = base
    base_dir = str(resolve_model_dir(args.base))  # builtin:NAME and .gguf files become a local 16-bit folder
    dq = False if args.no_double_quant else None  # None: not given, the adapter's record decides
    fmt = dict(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=dq)
    print(merge_target(base_dir, adapter, args.into, **fmt).describe(), flush=True)  # before the slow part
    res = merge_checkpoint(
        base_dir, adapter, args.out, into=args.into, dtype=args.dtype, skip=args.skip, device=args.device, **fmt
    )
    dtype = str(res.dtype).removeprefix("torch.")
    tok = f"; tokenizer files: {', '.join(res.tokenizer_files)}" if res.tokenizer_files else ""
    print(f"wrote {res.out_dir}: {res.merged_modules} modules merged into the {res.into} base weights, {dtype}{tok}")
    return 0
