"""``qlora train RECIPE.yaml [key=value ...]``: plan, then train (or resume)."""

from __future__ import annotations

import os
import sys

DEBUG_SIGNAL_ENV = "QLORA_DEBUG_SIGNAL_AT"  # test/debug hook, e.g. "5:SIGKILL": see qlora.train.loop


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Fine-tune with a recipe. Re-running the same command with the "
                       "same output_dir resumes from the newest complete checkpoint.")
    p.add_argument("recipe", help="path to a recipe YAML (e.g. recipes/tiny-cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. lora.rank=16 optimizer.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _debug_signal_at(raw: str | None) -> tuple[int, ...] | None:
    """Parse ``QLORA_DEBUG_SIGNAL_AT=STEP:SIGNAME[:RANK]`` (``SIGNAME`` defaults to SIGTERM) into
    ``(step, signum)``, or ``(step, signum, rank)``: under torchrun only that rank signals itself.

    Raises:
        InputError: the value is not of that form.
    """
    import signal

    from quant import InputError

    if not raw:
        return None
    step, _, rest = raw.partition(":")
    name, _, rank = rest.partition(":")
    try:
        parsed = (int(step), int(signal.Signals[name.strip().upper() or "SIGTERM"]))
        return parsed + ((int(rank),) if rank else ())
    except (ValueError, KeyError):
        raise InputError(f"{DEBUG_SIGNAL_ENV}={raw!r} is not STEP:SIGNAL[:RANK] (for example 5:SIGKILL, 3:SIGTERM "
                         f"or 2:SIGKILL:1); unset it for a normal run.") from None


def run(args) -> int:
    from qlora.train.loop import train
    from qlora.train.parallel import world_from_env
    from qlora.train.recipe import load_recipe
    from quant import InputError

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = train(recipe, say=lambda m: print(m, flush=True),
                       progress=not args.no_progress and sys.stderr.isatty(),
                       signal_at=_debug_signal_at(os.environ.get(DEBUG_SIGNAL_ENV)))
    except RuntimeError as e:  # a collective that failed: a peer died, or stopped answering (timeout)
        if not _collective_failed(e):
            raise
        raise InputError(
            f"A collective operation with the other ranks failed ({str(e).splitlines()[0][:200]}). Another rank "
            f"most likely died or stopped answering within distributed.timeout_s ({recipe.distributed.timeout_s} "
            f"s): see its error above or the launcher's summary. Nothing already written is lost: re-running the "
            f"same command resumes from the newest complete checkpoint in {recipe.output_dir}."
        ) from None
    if result.exit_code or world_from_env().rank:  # under torchrun, rank 0 speaks for the run
        return result.exit_code
    if result.nothing_to_do:
        print(f"nothing to do: {result.output_dir} already holds a finished run of {result.steps} steps; to train "
              f"again, raise max_steps or choose a new output_dir")
        return 0
    out = result.output_dir
    plots = ", ".join(str(out / f) for f in ("loss.png", "memory.png") if (out / f).exists()) or "none written"
    print(f"done: {result.steps} steps in {result.wall_s:.1f} s\n  adapter: {out} (PEFT format)\n"
          f"  metrics: {out / 'metrics.jsonl'}\n  plots:   {plots}")
    print(_next_commands(recipe, result))
    return 0


def _collective_failed(e: RuntimeError) -> bool:
    """True for the errors torch.distributed raises when a peer is gone (gloo, NCCL, the store), in a run of N."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, dist.DistError) or any(
        s in str(e) for s in ("Connection reset by peer", "Connection closed by peer", "Timed out", "gloo", "NCCL"))


def _next_commands(recipe, result) -> str:
    """What a user runs next: generate with the adapter (a held-out prompt when the run scored some), eval it,
    and merge it into a plain 16-bit model."""
    import shlex

    prompt = result.task_scores[-1][1].samples[0][0] if result.task_scores else "Hello! Who are you?"
    base, out = shlex.quote(recipe.model.path), shlex.quote(str(result.output_dir))
    lines = [f"next: qlora generate --base {base} --adapter {out} --prompt {shlex.quote(prompt)}"]
    data = recipe.data.eval_path or recipe.data.path
    lines.append(f"      qlora eval --base {base} --adapter {out} --data {shlex.quote(data)}")
    merged = shlex.quote(f"{result.output_dir}-merged")
    lines.append(f"      qlora merge --base {base} --adapter {out} --out {merged}")
    return "\n".join(lines)
