"""``qlora plan --gpu SPEC``: will this run fit, and with what settings?

Predicts the peak GPU memory of a QLoRA step from the model's config alone
(no weights, no GPU needed) and fits micro-batch, rank or sequence length to
the GPU. Exit status: 0 when the plan fits, 1 when nothing fits (the output
then lists changes that would), 2 for bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1 << 30


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Predict the peak GPU memory of a QLoRA training step and choose settings that fit. "
        "'GB' means the vendors' GiB-based size (a 24 GB card has 24 GiB).",
    )
    p.add_argument("--gpu", required=True, metavar="SPEC", help="GPU name (rtx4090, a100-80gb, h100, ...) or size (24GB, 80G, 16000MiB)")
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR", help="catalog name, config.json, model folder, recipe YAML or builtin:NAME (default llama-3.1-8b)")
    p.add_argument("--seq-len", default="2048", metavar="N|auto", help="tokens per sequence, or auto: the longest that fits (default 2048)")
    p.add_argument("--batch-size", default="auto", metavar="N|auto", help="micro-batch size, or auto: the largest that fits (default auto)")
    p.add_argument("--effective-batch", default="16", metavar="N", help="sequences per optimizer step; accumulation makes up the rest (default 16)")
    p.add_argument("--rank", default="16", metavar="N|auto", help="LoRA rank, or auto: the largest of 8..256 that fits (default 16)")
    p.add_argument("--alpha", default=None, metavar="A", help="LoRA alpha written to --out (default 2 x rank; no effect on memory)")
    p.add_argument("--targets", nargs="+", default=["all-linear"], metavar="T", help="all-linear, attention, qv, mlp, module names or a regex (default all-linear)")
    p.add_argument("--dropout", default="0.0", metavar="P", help="LoRA dropout (default 0)")
    p.add_argument("--dora", action="store_true", help="DoRA adapters")
    p.add_argument("--adapter-dtype", default="bfloat16", metavar="DTYPE", help="bfloat16 (default), float16 or float32")
    p.add_argument("--optimizer", default="paged_adamw_8bit", metavar="NAME", help="paged_adamw_8bit (default), paged_adamw_32bit, adamw_8bit or adamw")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every layer's activations instead of recomputing them")
    p.add_argument("--attn", default="auto", metavar="IMPL", help="sdpa, eager or auto (sdpa where the model has it; default)")
    p.add_argument("--chunked-loss", nargs="?", const="1024", default="1024", metavar="TOKENS",
                   help="qlora's chunked loss, TOKENS rows per chunk (the trainer's default: 1024)")
    p.add_argument("--hf-loss", action="store_true",
                   help="model transformers' loss on full fp32 logits instead (recipe chunked_loss: false)")
    p.add_argument("--offload-activations", action="store_true",
                   help="checkpointed layer inputs wait in pinned host memory (recipe offload_activations: true)")
    p.add_argument("--margin", default="0.05", metavar="F", help="fraction of the GPU kept free (default 0.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, metavar="RECIPE.yaml", help="write the chosen settings as a recipe (only when the plan fits)")


# ---------------------------------------------------------------------------- argument parsing


def _int_or_auto(value: str, flag: str):
    from quant.errors import InputError

    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{flag} must be a positive integer or 'auto', got {value!r}.") from None


def _number(value: str, flag: str, kind=float):
    from quant.errors import InputError

    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{flag} must be a number, got {value!r}.") from None


def _model_arg(model: str | None) -> str:
    """Resolve ``builtin:NAME`` to the config.json qlora ships for it; anything else passes through."""
    from quant.errors import InputError, choices

    if model is None:
        import memory

        return memory.DEFAULT_MODEL
    if model.startswith("builtin:"):
        from qlora.builtin_models import BUILTIN_MODELS

        name = model.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise InputError(f"Unknown built-in model {model!r}; valid choices are {choices(['builtin:' + k for k in BUILTIN_MODELS])}.")
        return str(BUILTIN_MODELS[name] / "config.json")
    return model


# ---------------------------------------------------------------------------- output


def plan_dict(p, alpha: float) -> dict:
    """The stable JSON object for a plan (see ``qlora plan --json``)."""
    fp = p.footprint
    return {
        "fits": p.fits,
        "model": fp.model,
        "gpu": {"name": p.gpu.name, "total_bytes": p.gpu.total_bytes, "note": p.gpu.note},
        "budget_bytes": p.budget_bytes,
        "margin": p.margin,
        "usable_bytes": p.usable_bytes,
        "peak_bytes": p.peak_bytes,
        "tensor_peak_bytes": fp.tensor_peak_bytes,
        "cuda_context_bytes": fp.cuda_context_bytes,
        "allocator_reserve_bytes": fp.allocator_reserve_bytes,
        "host_bytes": fp.host_bytes,
        "peak_phase": fp.peak_phase,
        "phases": fp.phases,
        "breakdown": fp.breakdown,
        "seq_len": p.seq_len,
        "micro_batch_size": p.micro_batch_size,
        "max_micro_batch_size": p.max_micro_batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "effective_batch_size": p.effective_batch_size,
        "rank": p.rank,
        "lora_alpha": alpha,
        "targets": list(fp.targets),
        "dropout": fp.dropout,
        "dora": fp.dora,
        "adapter_dtype": fp.adapter_dtype,
        "optimizer": fp.optimizer,
        "gradient_checkpointing": fp.gradient_checkpointing,
        "attn": fp.attn,
        "loss": fp.loss,
        "loss_chunk_tokens": fp.loss_chunk_tokens,
        "quantized_params": fp.quantized_params,
        "nf4_bits_per_param": fp.nf4_bits_per_param,
        "lora_params": fp.lora_params,
        "suggestions": [
            {"change": s.change, "settings": s.settings, "peak_bytes": s.footprint.device_total_bytes, "fits": s.fits}
            for s in p.suggestions
        ],
        "notes": list(p.notes),
    }


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(p, alpha: float, console) -> None:
    """Print the plan as a table (rich)."""
    from rich.table import Table

    import memory

    fp = p.footprint
    verdict = "[bold green]fits[/]" if p.fits else "[bold red]does not fit[/]"
    console.print(
        f"[bold]{fp.model}[/] on [bold]{p.gpu.name}[/] ({p.gpu.total_gib:.2f} GiB): {verdict} -- predicted "
        f"{_gib(p.peak_bytes)} GiB of {_gib(p.usable_bytes)} GiB usable ({p.margin:.0%} of the GPU kept free)"
    )
    console.print(
        f"seq_len {p.seq_len} | micro-batch {p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation = "
        f"{p.effective_batch_size} per step | LoRA r={p.rank}, alpha={alpha:g} on "
        f"{', '.join(t.rsplit('.', 1)[-1] for t in fp.targets)}"
        f"{' (DoRA)' if fp.dora else ''} | {fp.adapter_dtype} adapters | {fp.optimizer} | checkpointing "
        f"{'on' if fp.gradient_checkpointing else 'off'} | attention {fp.attn} | loss "
        f"{'chunked, ' + str(fp.loss_chunk_tokens) + ' tokens' if fp.loss == 'chunked' else 'transformers (full fp32 logits)'}"
    )
    t = Table(title=f"memory at the peak (phase: {fp.peak_phase})", show_footer=False)
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for key, label in memory.TERMS.items():
        value = fp.breakdown.get(key, 0)
        if value == 0:
            continue
        if key == "nf4_weights":
            label += f" ({fp.quantized_params / 1e9:.2f}e9 params x {fp.nf4_bits_per_param:.3f} bits)"
        t.add_row(label, _gib(value))
    t.add_row("[bold]tensor peak[/] (torch.cuda.max_memory_allocated)", f"[bold]{_gib(fp.tensor_peak_bytes)}[/]")
    t.add_row("CUDA context (not seen by torch.cuda.*)", _gib(fp.cuda_context_bytes))
    t.add_row("allocator cache + fragmentation (reserve)", _gib(fp.allocator_reserve_bytes))
    t.add_row("[bold]device total[/]", f"[bold]{_gib(fp.device_total_bytes)}[/]")
    console.print(t)
    console.print("phases (tensor GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in fp.phases.items()))
    for note in p.notes:
        console.print(f"note: {note}")
    if p.suggestions:
        console.print("[bold]changes that would fit[/], cheapest first:")
        for s in p.suggestions:
            console.print(f"  - {s.change}: {_gib(s.footprint.device_total_bytes)} GiB")
    elif not p.fits:
        console.print("no single change or catalog GPU makes this run fit.")


RECIPE_HEADER = """\
# Written by `qlora plan`: a recipe for `qlora train` with the planned settings.
# Fill in model.path (a local Hugging Face checkpoint folder) and data.path
# (a local jsonl/json/csv/parquet/txt file or a save_to_disk folder).
"""


def write_recipe(p, alpha: float, path: str, model_arg: str | None, output_dir: str = "runs/planned") -> Path:
    """Write the plan's settings as a ``qlora train`` recipe (validated, then written atomically).

    Raises:
        InputError: the mapping does not validate as a recipe (a bug, reported plainly).
    """
    import yaml

    from qlora.train.recipe import recipe_from_dict
    from quant.files import write_text_atomic

    fp = p.footprint
    if model_arg and model_arg.startswith("builtin:"):
        model_path = model_arg
    elif model_arg and Path(model_arg).expanduser().is_dir():
        model_path = str(Path(model_arg).expanduser().resolve())
    else:
        model_path = f"/path/to/{fp.model}"
    data = {
        "model": {"path": model_path,
                  "attn_implementation": fp.attn},
        "lora": {"targets": list(fp.targets), "rank": p.rank, "alpha": alpha, "dropout": fp.dropout,
                 "variant": "dora" if fp.dora else "lora", "dtype": fp.adapter_dtype},
        "data": {"path": "/path/to/train.jsonl"},
        "seq_len": p.seq_len,
        "micro_batch_size": p.micro_batch_size,
        "effective_batch_size": p.effective_batch_size,
        "optimizer": {"name": fp.optimizer},
        "gradient_checkpointing": fp.gradient_checkpointing,
        "chunked_loss": fp.loss == "chunked",
        "offload_activations": fp.offload_activations,
        "gpu": p.gpu.name,
        "output_dir": output_dir,
    }
    recipe_from_dict(data)  # what we write must be a valid recipe
    planned = (f"# Planned for {p.gpu.name}: predicted peak {p.peak_bytes / 2**30:.2f} GiB "
               f"of {p.usable_bytes / 2**30:.2f} GiB usable.\n")
    return write_text_atomic(path, RECIPE_HEADER + planned + yaml.safe_dump(data, sort_keys=False))


def run(args) -> int:
    import memory
    from quant.errors import InputError

    rank = _int_or_auto(args.rank, "--rank")
    targets = args.targets[0] if len(args.targets) == 1 else list(args.targets)
    chunk = None if args.hf_loss else _number(args.chunked_loss, "--chunked-loss", int)
    p = memory.plan(
        args.gpu,
        model=_model_arg(args.model),
        seq_len=_int_or_auto(args.seq_len, "--seq-len"),
        micro_batch_size=_int_or_auto(args.batch_size, "--batch-size"),
        rank=rank,
        effective_batch_size=_number(args.effective_batch, "--effective-batch", int),
        targets=targets,
        dropout=_number(args.dropout, "--dropout"),
        dora=args.dora,
        adapter_dtype=args.adapter_dtype,
        optimizer=args.optimizer,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        attn=args.attn,
        loss="hf" if chunk is None else "chunked",
        loss_chunk_tokens=chunk or 1024,
        margin=_number(args.margin, "--margin"),
        offload_activations=args.offload_activations,
    )
    alpha = _number(args.alpha, "--alpha") if args.alpha is not None else 2.0 * p.rank
    if args.json:
        json.dump(plan_dict(p, alpha), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        render(p, alpha, Console())
    if args.out:
        if not p.fits:
            raise InputError(f"Nothing fits on {p.gpu.name}, so no recipe was written to {args.out!r}; apply one of the listed changes first.")
        written = write_recipe(p, alpha, args.out, args.model)
        print(f"wrote {written}", file=sys.stderr)
    return 0 if p.fits else 1
