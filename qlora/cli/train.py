"""``qlora train RECIPE.yaml [key=value ...]``: plan, then train (or resume)."""

from __future__ import annotations

import sys


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Fine-tune with a recipe. Re-running the same command with the same output_dir resumes from the newest complete checkpoint.")
    p.add_argument("recipe", help="path to a recipe YAML (e.g. recipes/tiny-cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.rank=16 optimizer.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args) -> int:
    from qlora.train.recipe import load_recipe
    from qlora.train.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe, say=lambda m: print(m, flush=True), progress=not args.no_progress and sys.stderr.isatty())
    if result.exit_code:
        return result.exit_code
    print(f"done: {result.steps} steps in {result.wall_s:.1f} s; metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0
