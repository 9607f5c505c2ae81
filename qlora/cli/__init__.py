"""The ``qlora`` command line.

Each subcommand lives in its own module with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``; modules are imported
only when their command runs, so ``qlora plan`` stays fast.
User mistakes raise ``quant.InputError`` and are printed as one paragraph,
without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap

from quant.errors import InputError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("qlora.cli.quantize", "quantize a Hugging Face checkpoint to NF4/FP4 (bitsandbytes layout)"),
    "plan": ("qlora.cli.plan", "predict peak GPU memory and choose batch/rank/sequence settings that fit"),
    "merge": ("qlora.cli.merge", "merge a LoRA adapter into its base: write a plain 16-bit checkpoint"),
    "train": ("qlora.cli.train", "fine-tune with a recipe (plans first; resumes automatically)"),
    "generate": ("qlora.cli.generate", "sample from the 4-bit base model with an adapter"),
    "eval": ("qlora.cli.eval", "eval loss, perplexity and task accuracy of a base (+ adapter) on a data file"),
}


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora", description="QLoRA fine-tuning that fits: quantize, plan, train, merge, generate, eval."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details (dtype and memory decisions)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if name == only:
            importlib.import_module(module).add_parser(sub, name, help_)
        else:
            sub.add_parser(name, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(cmd if cmd in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except InputError as e:
        print(_error_prefix() + textwrap.fill(str(e), width=100, subsequent_indent="       "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _error_prefix() -> str:
    """``error: ``, or under torchrun ``error (rank 1 of 2): `` so the failing rank is named."""
    import os

    size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"error (rank {rank} of {size}): " if size not in ("", "1") else "error: "


if __name__ == "__main__":
    sys.exit(main())
