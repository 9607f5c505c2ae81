"""``qlora plan [--gpu SPEC] [--model NAME_OR_DIR_OR_RECIPE]``: will this run fit, and with what settings?

Predicts the peak GPU memory of a QLoRA step from the model's config alone
(no weights, no GPU needed) and fits micro-batch, rank or sequence length to
the GPU. The setting flags are generated from :class:`memory.Settings` (each
field's :class:`memory.Flag`), so they are named, documented and parsed in
one place. A recipe given as ``--model`` is planned exactly as ``qlora train``
plans it (:func:`qlora.train.plan.plan_recipe`), with the flags given
overriding its values, and its plan is printed as ``qlora train`` prints it.
Exit status: 0 when the plan fits, 1 when nothing fits (the output then
lists changes that would), 2 for bad input.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

GIB = 1 << 30
_RECIPE_SUFFIXES = (".yaml", ".yml")


def add_parser(sub, name: str, help_: str) -> None:
    import memory
    from memory.settings import PLAN_DEFAULTS

    p = sub.add_parser(
        name, help=help_,
        description="Predict the peak GPU memory of a QLoRA training step and choose settings that fit. "
        "'GB' means the vendors' GiB-based size (a 24 GB card has 24 GiB). With a recipe (--model RECIPE.yaml) "
        "the recipe's own values are the defaults and only the flags given override them.",
    )
    p.add_argument("--gpu", default=None, metavar="SPEC",
                   help="GPU name (rtx4090, a100-80gb, h100, ...) or size (24GB, 80G, 16000MiB); required unless "
                   "--model is a recipe (then: the recipe's gpu, else this machine's memory)")
    p.add_argument("--ram", default=None, metavar="SIZE|auto",
                   help="host memory the run must also fit: a size (64GB) or auto (this machine's available RAM); "
                   "default: not checked, except for a recipe planned for this machine (auto)")
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="catalog name, config.json, model folder, recipe YAML or builtin:NAME (default llama-3.1-8b)")
    for f in dataclasses.fields(memory.Settings):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        default = getattr(PLAN_DEFAULTS, f.name)
        if flag.parse is None:  # a switch
            p.add_argument(flag.name, dest=f.name, action="store_const", const=flag.const, default=None, help=flag.help)
            continue
        shown = " ".join(default) if isinstance(default, tuple) else default
        p.add_argument(flag.name, dest=f.name, metavar=flag.metavar, nargs=flag.nargs, default=None,
                       const=str(default) if flag.nargs == "?" else None, help=f"{flag.help} (default {shown})")
    p.add_argument("--alpha", default=None, metavar="A",
                   help="LoRA alpha written to --out (default 2 x rank, or the recipe's; no effect on memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, metavar="RECIPE.yaml",
                   help="write the chosen settings as a recipe (only when the plan fits)")


# ---------------------------------------------------------------------------- argument parsing


def explicit_settings(args) -> dict:
    """The :class:`memory.Settings` changes that the flags given on the command line ask for (field -> value).

    Raises:
        InputError: a value that does not parse (naming the flag), or two flags that contradict each other.
    """
    import memory
    from quant.errors import InputError

    changes: dict = {}
    given: dict[str, str] = {}  # field -> the flag that set it
    implied: dict[str, tuple] = {}  # field -> (value, the flag that implies it)
    for f in dataclasses.fields(memory.Settings):
        flag = f.metadata.get("flag")
        raw = getattr(args, f.name, None)
        if flag is None or raw is None:
            continue
        try:
            changes[f.name] = raw if flag.parse is None else flag.parse(raw)
        except ValueError:
            raise InputError(f"{flag.name} must be {flag.expects}, got {raw!r}.") from None
        given[f.name] = flag.name
        implied.update((key, (value, flag.name)) for key, value in flag.implies)
    for key, (value, by) in implied.items():
        if key in given and changes[key] != value:
            raise InputError(f"{given[key]} and {by} contradict each other; give one of them.")
        changes[key] = value
    return changes


def _number(value: str, flag: str, kind=float):
    from quant.errors import InputError

    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{flag} must be a number, got {value!r}.") from None


def _is_recipe(model: str | None) -> bool:
    return model is not None and Path(model).suffix.lower() in _RECIPE_SUFFIXES


def _model_arg(model: str | None) -> str:
    """The default model for None; ``builtin:NAME`` -> the config qlora ships for it; anything else as given."""
    if model is None:
        import memory

        return memory.DEFAULT_MODEL
    from qlora.builtin_models import model_source

    return model_source(model)


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
        "host": {
            "total_bytes": fp.host.total_bytes, "process_bytes": fp.host.process,
            "loader_peak_bytes": fp.host.loader_peak, "pinned_offload_bytes": fp.host.pinned_offload,
            "paged_optimizer_state_bytes": fp.host.paged_optimizer_state,
            "device_tensors_bytes": fp.host.device_tensors,
            "offloaded_params_bytes": fp.host.offloaded_params,
            "budget_bytes": p.host_budget_bytes, "fits": p.host_fits,
        },
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
        "vera": fp.vera,
        "adapter_dtype": fp.adapter_dtype,
        "optimizer": fp.optimizer,
        "gradient_checkpointing": fp.gradient_checkpointing,
        "attn": fp.attn,
        "loss": fp.loss,
        "loss_chunk_tokens": fp.loss_chunk_tokens,
        "offload_activations": fp.offload_activations,
        "tiled_mlp": fp.tiled_mlp,
        "tiled_norms": fp.tiled_norms,
        "tile_tokens": fp.tile_tokens,
        "gpus": fp.gpus,
        "strategy": fp.strategy,
        "offload_params": fp.offload_params,
        "quant_type": fp.quant_type,
        "quantized_params": fp.quantized_params,
        "nf4_bits_per_param": fp.nf4_bits_per_param,
        "lora_params": fp.lora_params,
        "suggestions": [
            {"change": s.change, "settings": s.settings, "peak_bytes": s.footprint.device_total_bytes, "fits": s.fits}
            for s in p.suggestions
        ],
        "notes": list(p.notes),
    }


def _tiled(fp) -> str:
    return " and ".join(name for name, on in (("MLP", fp.tiled_mlp), ("norms", fp.tiled_norms)) if on)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(p, alpha: float, console, notes: bool = True) -> None:
    """Print the plan as a table (rich); ``notes=False`` leaves out the notes (the trainer's summary has them)."""
    from rich.table import Table

    import memory

    fp = p.footprint
    verdict = "[bold green]fits[/]" if p.fits else "[bold red]does not fit[/]"
    each = f"{fp.gpus} x " if fp.gpus > 1 else ""
    console.print(
        f"[bold]{fp.model}[/] on [bold]{each}{p.gpu.name}[/] ({p.gpu.total_gib:.2f} GiB{' each' if each else ''}): "
        f"{verdict} -- predicted {_gib(p.peak_bytes)} GiB{' per GPU' if each else ''} of {_gib(p.usable_bytes)} GiB "
        f"usable ({p.margin:.0%} of the GPU kept free)"
    )
    if fp.gpus > 1:
        how = {"ddp": "ddp: each GPU holds the whole base; LoRA gradients all-reduced",
               "fsdp": "fsdp: base, adapter and optimizer state sharded over the GPUs"
               + ("; shards in pinned host memory (offload_params)" if fp.offload_params else "")}[fp.strategy]
        console.print(f"{fp.gpus} GPUs, {how}; every figure below is one GPU's (its process's, for the host)")
    console.print(
        f"seq_len {p.seq_len} | micro-batch {p.micro_batch_size} x {p.gradient_accumulation_steps} accumulation "
        + (f"x {fp.gpus} GPUs " if fp.gpus > 1 else "") + "= "
        f"{p.effective_batch_size} per step | "
        + (f"VeRA r={p.rank} on " if fp.vera else f"LoRA r={p.rank}, alpha={alpha:g} on ")
        + f"{', '.join(t.rsplit('.', 1)[-1] for t in fp.targets)}"
        f"{' (DoRA)' if fp.dora else ''} | {fp.adapter_dtype} adapters | {fp.optimizer} | checkpointing "
        f"{'on' if fp.gradient_checkpointing else 'off'} | attention {fp.attn} | loss "
        + (f"chunked, {fp.loss_chunk_tokens} tokens" if fp.loss == "chunked" else "transformers (full fp32 logits)")
        + (" | inputs offloaded" if fp.offload_activations else "")
        + (f" | {_tiled(fp)} in tiles of {fp.tile_tokens} tokens" if fp.tile_tokens else "")
    )
    t = Table(title=f"memory at the peak (phase: {fp.peak_phase})", show_footer=False)
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for key, label in memory.TERMS.items():
        value = fp.breakdown.get(key, 0)
        if value == 0:
            continue
        if key in ("nf4_weights", "base_weights_16bit"):  # only the one the format uses is nonzero
            label += f" ({fp.quantized_params / 1e9:.2f}e9 params x {fp.nf4_bits_per_param:.3f} bits)"
        t.add_row(label, _gib(value))
    t.add_row("[bold]tensor peak[/] (torch.cuda.max_memory_allocated)", f"[bold]{_gib(fp.tensor_peak_bytes)}[/]")
    t.add_row("CUDA context (not seen by torch.cuda.*)", _gib(fp.cuda_context_bytes))
    t.add_row("allocator cache + fragmentation (reserve)", _gib(fp.allocator_reserve_bytes))
    t.add_row("[bold]device total[/] (what the card must have)", f"[bold]{_gib(fp.device_total_bytes)}[/]")
    h = fp.host
    t.add_section()
    t.add_row("host: process (interpreter, torch, CUDA libraries)", _gib(h.process))
    t.add_row("host: loader transient (largest tensor x 2)", _gib(h.loader_peak))
    for label, value in (("host: pinned offload buffers", h.pinned_offload),
                         ("host: paged optimizer state", h.paged_optimizer_state),
                         ("host: CPU step tensors", h.device_tensors),
                         ("host: offloaded FSDP shards (params, grads, optimizer)", h.offloaded_params)):
        if value:
            t.add_row(label, _gib(value))
    verdict = ""
    if p.host_budget_bytes is not None:
        verdict = (" [green]fits[/]" if p.host_fits else " [bold red]does not fit[/]") + \
            f" in {_gib(p.host_budget_bytes)} GiB"
    t.add_row(f"[bold]host total[/] (process + the larger of loading, training){verdict}",
              f"[bold]{_gib(h.total_bytes)}[/]")
    console.print(t)
    console.print("phases (tensor GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in fp.phases.items()))
    for note in p.notes if notes else ():
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


def new_recipe_base(model_arg: str | None, model_name: str, output_dir: str = "runs/planned") -> dict:
    """The recipe mapping ``--out`` fills in when ``--model`` was not a recipe (model and data to fill in)."""
    if model_arg and model_arg.startswith("builtin:"):
        model_path = model_arg
    elif model_arg and Path(model_arg).expanduser().is_dir():
        model_path = str(Path(model_arg).expanduser().resolve())
    else:
        model_path = f"/path/to/{model_name}"
    return {"model": {"path": model_path}, "quant": {}, "lora": {}, "data": {"path": "/path/to/train.jsonl"},
            "output_dir": output_dir}


def write_recipe(p, alpha: float, path: str, base: dict, header: str = RECIPE_HEADER) -> Path:
    """Write the plan's settings into the recipe mapping ``base`` as a ``qlora train`` recipe.

    The settings go in through :func:`qlora.train.plan.settings_to_recipe`
    (the inverse of the mapping ``qlora train`` plans with); the result is
    validated as a recipe, then written atomically.

    Raises:
        InputError: a setting a recipe cannot express, or a mapping that does
            not validate as a recipe (a bug, reported plainly).
    """
    import yaml

    from qlora.train.plan import settings_to_recipe
    from qlora.train.recipe import recipe_from_dict
    from quant.files import write_text_atomic

    data = settings_to_recipe(p.settings, base)
    data["lora"]["alpha"] = alpha
    data["gpu"] = p.gpu.name
    recipe_from_dict(data)  # what we write must be a valid recipe
    planned = (f"# Planned for {p.gpu.name}: predicted peak {p.peak_bytes / 2**30:.2f} GiB "
               f"of {p.usable_bytes / 2**30:.2f} GiB usable.\n")
    return write_text_atomic(path, header + planned + yaml.safe_dump(data, sort_keys=False))


def run(args) -> int:
    """``qlora plan``: 0 when the plan fits, 1 when nothing fits.

    Raises:
        InputError: bad flags, an unknown GPU or model, no --gpu for a non-recipe model, --out when nothing fits.
    """
    import memory
    from quant.errors import InputError

    changes = explicit_settings(args)
    if _is_recipe(args.model):
        return _run_recipe(args, changes)
    if args.gpu is None:
        raise InputError(
            "--gpu is required for a catalog model, config.json or model folder: name the GPU to plan for, "
            "e.g. --gpu 24GB or --gpu rtx4090. Only with a recipe (--model RECIPE.yaml) may it be left out: "
            "the recipe's own gpu key, else this machine's memory, is the budget then."
        )
    p = memory.plan(args.gpu, _model_arg(args.model), ram=args.ram, **changes)
    alpha = _number(args.alpha, "--alpha") if args.alpha is not None else 2.0 * p.rank
    _show(p, alpha, args.json)
    if args.out:
        _refuse_unless_fits(p, args.out)
        written = write_recipe(p, alpha, args.out, new_recipe_base(args.model, p.footprint.model))
        print(f"wrote {written}", file=sys.stderr)
    return 0 if p.fits else 1


def _run_recipe(args, changes: dict) -> int:
    """``--model RECIPE.yaml``: plan it as ``qlora train`` does, print what it prints, then the table."""
    from qlora.train.plan import model_label, plan_recipe, plan_summary
    from qlora.train.recipe import load_recipe, recipe_to_dict

    recipe = load_recipe(args.model)
    p = plan_recipe(recipe, gpu=args.gpu, ram=args.ram, **changes)
    alpha = _number(args.alpha, "--alpha") if args.alpha is not None else recipe.lora.alpha
    if args.json:
        _show(p, alpha, True)
    else:
        print(plan_summary(p, model_label(recipe)), flush=True)  # plain text: the very lines qlora train logs
        _show(p, alpha, False, notes=False)
    if args.out:
        _refuse_unless_fits(p, args.out)
        header = f"# Written by `qlora plan` from {args.model} with the planned settings.\n"
        written = write_recipe(p, alpha, args.out, recipe_to_dict(recipe), header)
        print(f"wrote {written}", file=sys.stderr)
    return 0 if p.fits else 1


def _show(p, alpha: float, as_json: bool, notes: bool = True) -> None:
    if as_json:
        json.dump(plan_dict(p, alpha), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        render(p, alpha, Console(), notes)


def _refuse_unless_fits(p, out: str) -> None:
    from quant.errors import InputError

    if not p.fits:
        raise InputError(
            f"Nothing fits on {p.gpu.name}, so no recipe was written to {out!r}; apply one of the listed changes first."
        )
