"""The training loop: a few named pieces around one short loop, no Trainer class.

recipe -> plan (resolve ``auto``, refuse what cannot fit) -> data -> NF4 base (streamed) -> LoRA -> loop
(autocast forward, checkpointed layers, token-normalized loss over the whole accumulation group, backward,
clip, optimizer step) -> checkpoints (atomic) -> final adapter, metrics, plots.

:func:`train` reads top to bottom: :func:`_setup` (plan, data, model, optimizer: a :class:`_Run`),
:func:`_restore` (the newest checkpoint's optimizer, scheduler and RNG state), the loop, which calls
:func:`_optimizer_step` once per step and decides what to evaluate, log and save, and :func:`_finish`.

Under ``torchrun`` every rank runs the same function: the model goes through
:class:`qlora.train.parallel.ParallelModel` (DDP or FSDP2), each rank takes
its micro-batches of every step, and rank 0 alone prints and writes
(:mod:`qlora.train.parallel`); on one process all of that reduces to the plain loop.

Test/debug hook: ``train(..., signal_at=(N, signum))`` makes the process send itself ``signum`` right after
step N is logged and checkpointed, so kill-and-resume tests stop at a known step instead of racing a timer
(``qlora train`` reads it from ``QLORA_DEBUG_SIGNAL_AT=N:SIGNAME``). It is not a recipe key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.data import epoch_order
from qlora.lora.adalora import RankAllocator, adalora_schedule
from qlora.tasks import evaluate_task
from qlora.train import checkpoints as ckpts
from qlora.train import parallel
from qlora.train import state as run_state
from qlora.train.build import build_model
from qlora.train.loss import CHUNK_TOKENS
from qlora.train.metrics import LogWindow, MetricsLog, StepStats, log_line, peak_memory, plot_run, progress_bar
from qlora.train.optim import build_optimizer, build_scheduler
from qlora.train.parallel import ParallelModel, World
from qlora.train.plan import RunPlan, plan_run
from qlora.train.precision import resolve_dtypes
from qlora.train.recipe import Recipe, recipe_to_dict
from qlora.train.setup import RunData, diagnostics_fn, load_data, param_groups, resolve_device
from qlora.train.step import accumulate_gradients, batch_of, evaluate
from qlora.train.stops import EXIT_NAN, EXIT_OOM, OOM_ADVICE, StopSignals, TrainResult, first_line, is_oom

log = logging.getLogger(__name__)

_epoch_order = functools.lru_cache(maxsize=1)(epoch_order)  # an epoch's row order is built once, not per sample


@dataclass
class _Run:
    """What the loop reads, built once by :func:`_setup`. ``recipe`` is the resolved recipe (planned seq_len,
    micro-batch size and rank): a copy, the caller's recipe is never edited."""

    recipe: Recipe
    plan: RunPlan
    device: torch.device
    out: Path
    data: RunData
    model: torch.nn.Module
    par: ParallelModel
    save_adapter: Callable[[Path], None]
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    params: list[torch.Tensor]
    total_steps: int
    chunk: int | None
    checkpoint: Path | None
    allocator: RankAllocator | None = None  # AdaLoRA's (lora.variant adalora)

    @property
    def world(self) -> World:
        return self.par.world


def _setup(recipe: Recipe, say: Callable[[str], None]) -> tuple[_Run, dict | None]:
    """Plan, then data, model, optimizer and scheduler; the newest checkpoint's state is read, not applied.

    On N ranks (``torchrun``) every rank plans, reads the data and builds the model alike, checks that
    the others agree, then wraps the model for the recipe's strategy (:mod:`qlora.train.parallel`)
    before the optimizer is built on the (possibly sharded) parameters.

    Returns:
        ``(run, state)``: ``state`` is that checkpoint's trainer state (None for a fresh run),
        read before any weight is loaded so that a broken state file fails fast.

    Raises:
        InputError: see :func:`train`.
    """
    d = recipe.distributed
    world, device = parallel.init_world(resolve_device(recipe.device), d.backend, d.timeout_s)
    parallel.check_same(world, "recipe", recipe_to_dict(recipe))
    recipe = resolve_dtypes(recipe, device, say)  # auto dtypes become names: the plan, the model and recipe.yaml agree
    out = Path(recipe.output_dir)
    ckpts.check_output_dir(out)  # a file or a read-only folder: said now, not after the model is loaded
    torch.manual_seed(recipe.seed)  # the same on every rank: LoRA starts identical everywhere
    plan = plan_run(recipe, device, gpus=world.size)  # before any weights are read
    say(plan.summary)
    strategy = plan.strategy
    if world.distributed:
        parallel.check_strategy(strategy, recipe.optimizer.name, plan.autocast_dtype)
    recipe = dataclasses.replace(recipe, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                                 tiled_mlp=plan.tiled_mlp, tiled_norms=plan.tiled_norms,
                                 lora=dataclasses.replace(recipe.lora, rank=plan.rank),
                                 distributed=dataclasses.replace(d, strategy=strategy))
    data = load_data(recipe.data, plan.tokenizer, plan.seq_len, recipe.seed)
    say(data.summary)
    n_rows = data.rows["input_ids"].shape[0]
    per_step = plan.micro_batch_size * plan.grad_accum * world.size
    parallel.check_rows(world, n_rows, plan.micro_batch_size)
    parallel.check_same(world, "data (rows and target counts)", [n_rows, sum(data.row_targets)])
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * n_rows / per_step))
    # rank 0 cleans up after a killed writer; the others only look, once it has
    last = ckpts.latest_checkpoint(out) if world.main else None
    if world.distributed:
        last = parallel.gather_objects(world, last)[0]
    state = None
    if last is not None:  # a damaged checkpoint is named, and a changed recipe refused, before any model loads
        saved, state = ckpts.open_checkpoint(last)
        ckpts.check_resumable(last, saved, recipe_to_dict(recipe))
    ada = adalora_schedule(recipe.lora, total_steps)
    model, _, initial = build_model(
        plan.model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype, recipe.gradient_checkpointing,
        recipe.offload_activations, resume_adapter=None if last is None else last / "adapter",
        attn_implementation=recipe.model.attn_implementation,
        tiled_mlp=plan.tiled_mlp, tiled_norms=plan.tiled_norms, tile_tokens=plan.tile_tokens,
        shard_unit=parallel.unit_sharder(world, strategy, plan.offload_params, device), seed=recipe.seed,
        adalora=ada,
    )
    chunk = CHUNK_TOKENS if recipe.chunked_loss else None
    saver = parallel.adapter_saver(model, plan.model_dir, initial, None if ada is None else ada.peft_fields())
    par = ParallelModel(model, world, strategy, chunk, plan.autocast_dtype, device, plan.offload_params)
    if world.distributed and world.rank:
        torch.manual_seed(recipe.seed + world.rank)  # LoRA dropout draws its own masks on each rank
    if strategy == "fsdp" and world.distributed:
        log.info("fsdp: the per-module LoRA diagnostics (diagnostics_steps) are off: adapters, bases and gradients "
                 "are shards on each rank")
    # after any resume and any sharding: the optimizer must hold the installed (sharded) tensors
    groups = param_groups(model, recipe.optimizer, recipe.lora.loraplus_ratio)
    o, s = recipe.optimizer, recipe.schedule
    opt = build_optimizer(groups, o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    sched = build_scheduler(opt, total_steps, s.warmup_steps, s.name, s.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type) if plan.autocast_dtype == torch.float16 else None
    params = [p for g in groups for p in g["params"]]
    run = _Run(recipe, plan, device, out, data, model, par, lambda f: saver(par, f), opt, sched, scaler, params,
               total_steps, chunk, last, None if ada is None else RankAllocator(model, ada))
    return run, state


def _restore(run: _Run, state: dict | None, say: Callable[[str], None]) -> int:
    """Load a checkpoint's optimizer, scheduler, scaler and RNG state into ``run``; returns its step (0 for none)."""
    if state is None:
        return 0
    step = run_state.restore(state, run.par, run.opt, run.sched, run.scaler, run.checkpoint)
    if run.allocator is not None:
        run.allocator.load_state_dict(state["adalora"])
    if step >= run.total_steps:
        say(f"{run.out} already holds a finished run ({run.checkpoint.name}); writing its adapter and plots again")
    else:
        say(f"resuming from {run.checkpoint} (step {step} of {run.total_steps})")
    return step


def _rows_of_step(run: _Run, step: int) -> list[int]:
    """Rows of a step on all ranks: the g-th sequence of the run is a pure function of (g, seed), so resume
    replays it, and every rank knows every rank's rows."""
    per_step = run.recipe.micro_batch_size * run.plan.grad_accum * run.world.size
    n = len(run.data.row_targets)
    return [_epoch_order(n, g // n, run.recipe.seed)[g % n] for g in range(step * per_step, (step + 1) * per_step)]


def _optimizer_step(run: _Run, step: int) -> StepStats:
    """Step ``step + 1``: forward/backward over its micro-batches, clip, optimizer and scheduler step.

    When the loss is not finite the optimizer step is skipped and the
    gradients are dropped, so the parameters stay those of the last good
    step; the returned ``loss`` tells the caller.
    """
    t0 = time.time()
    micro, r, world = run.recipe.micro_batch_size, run.recipe, run.world
    ids = _rows_of_step(run, step)
    parts = [ids[m * micro:(m + 1) * micro] for m in range(run.plan.grad_accum * world.size)]
    counts = [sum(run.data.row_targets[i] for i in p) for p in parts]  # host ints: no device read-back
    mine = range(world.rank, len(parts), world.size)  # micro-batch m goes to rank m mod N
    micro_batches = [batch_of(run.data.rows, parts[m], run.device) for m in mine]
    mean_loss = accumulate_gradients(run.model, micro_batches, run.chunk, run.plan.autocast_dtype, run.scaler,
                                     [counts[m] for m in mine], parallel=run.par, step_targets=sum(counts))
    mean_loss = parallel.all_sum(world, mean_loss)  # each rank held its share of the global mean
    if run.allocator is not None:  # AdaLoRA's orthogonality penalty, once per step (not in the logged loss)
        run.allocator.orth_backward(run.scaler)
    if run.scaler is not None:
        run.scaler.unscale_(run.opt)
    diag = {}
    # under fsdp the adapter, its base and its gradients are shards: the per-module norms are not computed
    if r.diagnostics_steps and (step + 1) % r.diagnostics_steps == 0 and run.par.strategy != "fsdp":
        # before zero_grad: the grad-norm ratio needs the grads. Reads norms back module by module
        # (host syncs), which is why it runs every diagnostics_steps, not every step.
        diag = diagnostics_fn(run.model)
    gnorm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(run.params, r.max_grad_norm or float("inf")))
    # The step's one host sync: the CPU waits for the backward to finish (on a GPU, the launch queue drains
    # once per step), because the NaN guard must decide before opt.step touches the parameters.
    loss, grad_norm = torch.stack([mean_loss, gnorm.to(mean_loss)]).tolist()
    lr = run.sched.get_last_lr()[0]
    if math.isfinite(loss):
        if run.scaler is not None:
            run.scaler.step(run.opt)  # reads found_inf back (.item()): a second sync, fp16 GPUs only
            run.scaler.update()
        else:
            run.opt.step()
        run.sched.step()
        if run.allocator is not None:  # with the step's gradients still in place, as PEFT's update_and_allocate
            run.allocator.step(step)
    run.opt.zero_grad(set_to_none=True)
    peak, kind = peak_memory(run.device)
    return StepStats(loss, lr, grad_norm, sum(counts), len(ids) * r.seq_len, time.time() - t0, peak, kind, diag)


def _save(run: _Run, step: int) -> Path:
    """A checkpoint of ``step`` (adapter, optimizer, scheduler, scaler, RNG, resolved recipe).

    On N ranks every rank takes part (the sharded adapter and optimizer state are gathered, each rank's
    RNG state collected), rank 0 writes, and all wait for it: a rank killed after this returns loses nothing.
    """
    st = run_state.collect(run.par, run.opt, run.sched, run.scaler, step)
    path = run.out / f"checkpoint-{step:07d}"
    if st is not None and run.allocator is not None:
        st["adalora"] = run.allocator.state_dict()
    if st is not None:
        resolved = recipe_to_dict(run.recipe)
        path = ckpts.save_checkpoint(run.out, step, run.save_adapter, st, resolved, run.recipe.keep_checkpoints)
    else:
        run.save_adapter(None)  # its part of gathering the adapter
    parallel.barrier(run.world)
    return path


def _eval_record(run: _Run) -> dict:
    ev = evaluate(run.model, run.data.eval_rows, run.recipe.micro_batch_size, run.chunk, run.plan.autocast_dtype,
                  run.device, run.par)
    return {"eval_loss": ev, "eval_ppl": math.exp(min(ev, 50))}


def _task_record(run: _Run, step: int, result: TrainResult, say: Callable[[str], None]) -> dict:
    """Answer the first ``task.examples`` held-out prompts greedily, score them exactly and print one sample.

    Costs a generation pass (about ``examples x max_new_tokens`` decode steps in batches of ``task.batch_size``),
    which is why it runs at the start and the end only, not every ``eval_steps``.
    """
    t = run.recipe.task
    if not t.examples or not run.data.eval_tasks:
        return {}
    was_training = run.model.training
    dtype = run.plan.autocast_dtype
    # every rank answers the same prompts (FSDP2 gathers each layer on all of them); rank 0 reports
    with run.par.generating() as model, torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
        score = evaluate_task(model, run.plan.tokenizer, run.data.eval_tasks[: t.examples], t.max_new_tokens,
                              t.batch_size)
    run.model.train(was_training)
    result.task_scores.append((step, score))
    prompt, reply, reference = score.samples[0]
    say(f"step {step}: {score.summary()}\n  sample prompt: {prompt.splitlines()[-1]}\n  reply:    {reply}\n"
        f"  expected: {reference}")
    rec = {"task_exact_match": score.exact_match}
    return rec if score.valid_json is None else rec | {"task_valid_json": score.valid_json}


def _log(run: _Run, metrics: MetricsLog | None, window: LogWindow, bar, say: Callable[[str], None], step: int,
         extra: dict | None = None) -> None:
    """Write the window's train record for ``step`` (plus ``extra``, e.g. eval) to the log and to the bar, or
    without a bar (output not a terminal, ``--no-progress``) as one plain line (rank 0)."""
    if metrics is None:
        window.record(step, run.plan.predicted_peak_bytes)  # other ranks: the window starts afresh all the same
        return
    rec = window.record(step, run.plan.predicted_peak_bytes)
    rec.update(extra or {})
    metrics.write(rec)
    if bar is None:
        say(log_line(rec, run.total_steps))
    else:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                        peak=f"{rec['peak_bytes'] / 2**30:.2f}G", refresh=False)


def _finish(run: _Run, metrics: MetricsLog | None, result: TrainResult, say: Callable[[str], None]) -> None:
    """Final adapter (finished runs only), the eval summary, then metrics and plots (always; rank 0's)."""
    if result.stopped == "done" and not run.world.main:
        run.save_adapter(None)  # its part of gathering the adapter
    if metrics is None:
        return
    if result.stopped == "done":
        run.save_adapter(run.out)  # the checkpoints' own writer: file by file into output_dir, weights first
        if run.data.eval_rows is not None and result.eval_losses:
            first = next((r["eval_loss"] for r in metrics.records if r.get("step") == 0 and "eval_loss" in r), None)
            say(f"eval loss: {first if first is None else round(first, 4)} at step 0 -> "
                f"{result.eval_losses[-1][1]:.4f} at step {result.steps}")
        if len(result.task_scores) == 2:
            (a, before), (b, after) = result.task_scores
            say(f"task exact match: {before.exact_match:.1%} at step {a} -> {after.exact_match:.1%} at step {b}")
    metrics.close()
    try:
        plot_run(metrics.records, run.out)
    except Exception as e:  # plotting must never lose a finished run
        log.warning("could not write plots: %s", e)


def train(recipe: Recipe, say: Callable[[str], None] = print, progress: bool = True,
          signal_at: tuple[int, ...] | None = None) -> TrainResult:
    """Run (or resume) the fine-tuning a recipe describes; ``recipe`` itself is not modified.

    Train records go to metrics.jsonl every ``recipe.log_steps`` steps, and
    always at an eval or checkpoint step, the last step and before a stop;
    starting intervals afresh at each checkpoint keeps a run resumed from a
    periodic checkpoint logging exactly what an uninterrupted one does (a
    stop by signal, NaN or OOM writes its partial interval first).

    Launched by ``torchrun`` on N processes, every rank runs this function; only rank 0 prints
    (``say``), shows progress and writes files (:mod:`qlora.train.parallel`).

    Args:
        signal_at: test/debug hook ``(step, signum)``: after that step is logged and checkpointed,
            the process sends itself ``signum`` (``signal.raise_signal``, delivered before it returns).
            With ``(step, signum, rank)`` only that rank does.

    Raises:
        InputError: bad recipe values, data or model folder; a run the planner
            predicts will not fit (the message carries its suggestions).
    """
    t0 = time.time()
    if parallel.world_from_env().rank:  # ranks other than 0 stay quiet; their errors still reach the launcher
        say, progress = (lambda m: None), False
    try:
        run, state = _setup(recipe, say)
    except (MemoryError, RuntimeError) as e:  # the model did not fit while it loaded: nothing was written yet
        if not is_oom(e):
            raise
        say(f"error: out of memory while loading the model and building the run ({first_line(e)}); no step ran "
            f"and nothing was written. {OOM_ADVICE}")
        return TrainResult(Path(recipe.output_dir), 0, "oom", exit_code=EXIT_OOM, wall_s=time.time() - t0)
    start = _restore(run, state, say)
    del state  # the optimizer holds its own copy now
    r, eval_rows, world = run.recipe, run.data.eval_rows, run.world
    metrics = None
    if world.main:
        run.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(run.out / "metrics.jsonl", resume_step=start)
    result = TrainResult(run.out, start, "done", start if run.checkpoint is not None else None)
    window, bar, step = LogWindow(), None, start
    where = "the step-0 eval"  # what was running when memory ran out, for the message
    with StopSignals() as stop:
        try:
            if start == 0 and eval_rows is not None:
                ev = _eval_record(run)
                say(f"step 0: eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})")
                task = _task_record(run, 0, result, say)
                if metrics is not None:
                    metrics.write({"step": 0, **ev, **task})
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            bar = progress_bar(progress, run.total_steps, start)
            run.model.train()
            while step < run.total_steps:
                where = f"step {step + 1}"
                stats = _optimizer_step(run, step)
                if not math.isfinite(stats.loss):
                    if window:
                        _log(run, metrics, window, bar, say, step)
                    path = _save(run, step)  # parameters are still those of the last good step
                    say(f"error: the loss became {stats.loss} at step {step + 1}; stopped. The last good state is "
                        f"saved in {path}. Lower optimizer.lr, raise schedule.warmup_steps, or check the data.")
                    result.stopped, result.exit_code = "nan", EXIT_NAN
                    break
                step += 1
                window.add(stats)
                if bar is not None:
                    bar.update(1)
                last, saving = step == run.total_steps, step % r.save_steps == 0
                where = f"the eval after step {step}"
                ev = _eval_record(run) if eval_rows is not None and (step % r.eval_steps == 0 or last) else None
                if ev is not None:
                    result.eval_losses.append((step, ev["eval_loss"]))
                task = _task_record(run, step, result, say) if last else {}
                if ev is not None or saving or last or step % r.log_steps == 0:
                    _log(run, metrics, window, bar, say, step, {**(ev or {}), **task})
                if saving or last:
                    path = _save(run, step)  # the last one too: re-running a finished run then has nothing to redo
                    if bar is None and not last:
                        say(f"step {step}: saved {path}")
                if signal_at is not None and step == signal_at[0] and signal_at[2:] in ((), (world.rank,)):
                    signal.raise_signal(signal_at[1])  # test/debug hook; a SIGTERM handler has run when this returns
                if parallel.any_rank(world, stop.signum is not None, run.device):  # all ranks stop at the same step
                    if window:
                        _log(run, metrics, window, bar, say, step)
                    path = _save(run, step)
                    signum = stop.signum or signal.SIGTERM  # a rank that saw no signal stops with its peers
                    name = signal.Signals(signum).name
                    say(f"received {name}: saved {path}; re-run the same command to resume.")
                    result.stopped, result.exit_code = "signal", 128 + signum
                    break
        except (MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError is a RuntimeError, as is the CPU's
            if not is_oom(e):
                raise
            run.opt.zero_grad(set_to_none=True)
            if window:
                _log(run, metrics, window, bar, say, step)
            peak, kind = peak_memory(run.device)
            # one process saves the state before this step; on N ranks the others are mid-step, so a save (a
            # collective) would hang: the newest checkpoint stays the resume point
            if world.distributed:
                saved = f"Rank {world.rank} ran out; the newest checkpoint in {run.out} is where a re-run resumes."
            elif step > start:
                saved = f"The state before {where} is saved in {_save(run, step)}."
            else:  # nothing trained since the start or the checkpoint resumed from: nothing new to keep
                saved = "No step was trained in this run, so nothing new was saved."
            if world.distributed and not world.main:
                print(f"error (rank {world.rank} of {world.size}): out of memory at {where}", flush=True)
            say(
                f"error: out of memory at {where} ({first_line(e)}). The planner predicted a peak of "
                f"{run.plan.predicted_peak_bytes / 2**30:.2f} GiB; measured so far {peak / 2**30:.2f} GiB ({kind}). "
                f"{saved} {OOM_ADVICE}"
            )
            result.stopped, result.exit_code = "oom", EXIT_OOM
        finally:
            if bar is not None:
                bar.close()
    result.steps = step
    if result.stopped != "oom" or not world.distributed:
        _finish(run, metrics, result, say)
        parallel.close_world(world)
    elif metrics is not None:
        metrics.close()
    result.wall_s = time.time() - t0
    return result
