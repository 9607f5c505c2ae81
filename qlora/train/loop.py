"""The training loop: a few named pieces around one short loop, no Trainer class.

recipe -> plan (resolve ``auto``, refuse what cannot fit) -> data -> NF4 base (streamed) -> LoRA -> loop
(autocast forward, checkpointed layers, token-normalized loss over the whole accumulation group, backward,
clip, optimizer step) -> checkpoints (atomic) -> final adapter, metrics, plots.

:func:`train` reads top to bottom: :func:`_setup` (plan, data, model, optimizer: a :class:`_Run`),
:func:`_restore` (the newest checkpoint's optimizer, scheduler and RNG state), the loop, which calls
:func:`_optimizer_step` once per step and decides what to evaluate, log and save, and :func:`_finish`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora.data import epoch_order
from qlora.tasks import TaskScore, evaluate_task
from qlora.train import checkpoints as ckpts
from qlora.train.loss import CHUNK_TOKENS, causal_lm_loss, targets_per_row
from qlora.train.metrics import LogWindow, MetricsLog, StepStats, peak_memory, plot_run, progress_bar
from qlora.train.optim import build_optimizer, build_scheduler
from qlora.train.plan import RunPlan, plan_run
from qlora.train.precision import resolve_dtypes
from qlora.train.recipe import Recipe, recipe_to_dict
from qlora.train.setup import RunData, build_model, diagnostics_fn, load_data, param_groups, resolve_device, row_targets
from quant.errors import InputError

log = logging.getLogger(__name__)

EXIT_OOM, EXIT_NAN = 3, 4  # a stop by signal exits 128 + its number, as a shell reports it (SIGINT 130, SIGTERM 143)
_epoch_order = functools.lru_cache(maxsize=1)(epoch_order)  # an epoch's row order is built once, not per sample


@dataclass
class TrainResult:
    """How a run ended: its folder, last step, why it stopped, eval losses by step and the exit code."""

    output_dir: Path
    steps: int
    stopped: str  # "done", "signal", "oom", "nan"
    resumed_from: int | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    task_scores: list[tuple[int, TaskScore]] = field(default_factory=list)  # (step, score) at the start and the end
    wall_s: float = 0.0
    exit_code: int = 0

    @property
    def nothing_to_do(self) -> bool:
        """True for a re-run of a finished run: no step was trained (its adapter and plots were rewritten)."""
        return self.stopped == "done" and self.resumed_from is not None and self.resumed_from >= self.steps


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


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
    save_adapter: Callable[[Path], Path]
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    params: list[torch.Tensor]
    total_steps: int
    chunk: int | None
    checkpoint: Path | None


def _batch(rows: dict, idx: list[int], device: torch.device) -> dict:
    return {k: v[idx].to(device, non_blocking=True) for k, v in rows.items()}


def _targets(labels: torch.Tensor) -> int:
    return int(targets_per_row(labels).sum())  # a host sync when labels live on a GPU: callers pass counts instead


def forward_loss(model, batch: dict, chunk_tokens: int | None, autocast_dtype: torch.dtype,
                 n_targets: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed loss over one micro-batch and its target-token count.

    ``chunk_tokens`` set: :func:`qlora.train.loss.causal_lm_loss` on the final
    hidden states (never materializes all logits). ``None``: transformers'
    own loss on full fp32 logits (the standard path), asked for a sum through
    ``num_items_in_batch`` so that normalization stays with the caller.
    ``n_targets`` is the micro-batch's target count when the caller knows it
    (the trainer counts on its host rows); ``None`` counts ``batch['labels']``,
    a host sync on a GPU.
    """
    device_type = batch["input_ids"].device.type
    # float32 "autocast" is no autocast (CPU autocast refuses it with a warning)
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        if chunk_tokens is None:
            n = _targets(batch["labels"]) if n_targets is None else n_targets
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False, num_items_in_batch=max(n, 1))
            return out.loss * max(n, 1), n
        out = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        # causal_lm_loss picks the target rows with nonzero(): one host sync per micro-batch (a data-dependent
        # shape), the price of never running the head on prompt tokens
        return causal_lm_loss(out[0], model.get_output_embeddings().weight, batch["labels"], chunk_tokens, softcap)


def accumulate_gradients(model, micro_batches: list[dict], chunk_tokens: int | None, autocast_dtype: torch.dtype,
                         scaler=None, n_targets: list[int] | None = None) -> torch.Tensor:
    """Forward/backward every micro-batch of one optimizer step.

    Each micro-batch's summed loss is divided by the target-token count of the *whole* step, so the
    accumulated gradient equals that of one big batch however the step is split into micro-batches.
    ``n_targets``: each micro-batch's target count when the caller knows it; ``None`` counts the labels
    (one host sync per micro-batch on a GPU).

    Returns:
        The step's mean loss per target token: a float64 0-dim tensor on the device, not yet read back
        (``float()`` it when the number is needed).
    """
    counts = [_targets(b["labels"]) for b in micro_batches] if n_targets is None else n_targets
    denom = max(1, sum(counts))
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["input_ids"].device)
    for b, n in zip(micro_batches, counts):
        loss_sum, _ = forward_loss(model, b, chunk_tokens, autocast_dtype, n)
        loss = loss_sum / denom
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss_sum.detach()  # summed on the device in float64 (as a Python float sum would): no sync here
    return total / denom


@torch.no_grad()
def evaluate(model, rows: dict, micro_batch: int, chunk_tokens: int | None, autocast_dtype, device) -> float:
    """Token-weighted mean eval loss (nats/token) over all eval rows."""
    was_training = model.training
    model.eval()
    targets = row_targets(rows)  # counted where the rows live (the host, in the trainer)
    n_rows = rows["input_ids"].shape[0]
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, n_rows, micro_batch):
        idx = list(range(start, min(start + micro_batch, n_rows)))
        k = sum(targets[i] for i in idx)
        loss, _ = forward_loss(model, _batch(rows, idx, device), chunk_tokens, autocast_dtype, k)
        total += loss
        n += k
    model.train(was_training)
    return float(total) / max(n, 1)  # one host sync per evaluation


def _setup(recipe: Recipe, say: Callable[[str], None]) -> tuple[_Run, dict | None]:
    """Plan, then data, model, optimizer and scheduler; the newest checkpoint's state is read, not applied.

    Returns:
        ``(run, state)``: ``state`` is that checkpoint's trainer state (None for a fresh run),
        read before any weight is loaded so that a broken state file fails fast.

    Raises:
        InputError: see :func:`train`.
    """
    device = resolve_device(recipe.device)
    recipe = resolve_dtypes(recipe, device, say)  # auto dtypes become names: the plan, the model and recipe.yaml agree
    out = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)
    plan = plan_run(recipe, device)  # before any weights are read
    say(plan.summary)
    recipe = dataclasses.replace(recipe, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                                 tiled_mlp=plan.tiled_mlp, tiled_norms=plan.tiled_norms,
                                 lora=dataclasses.replace(recipe.lora, rank=plan.rank))
    data = load_data(recipe.data, plan.tokenizer, plan.seq_len, recipe.seed)
    say(data.summary)
    n_rows = data.rows["input_ids"].shape[0]
    per_step = plan.micro_batch_size * plan.grad_accum
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * n_rows / per_step))
    last = ckpts.latest_checkpoint(out)
    state = ckpts.load_trainer_state(last) if last is not None else None
    model, save = build_model(
        plan.model_dir, device, recipe.quant, recipe.lora, recipe.model.dtype, recipe.gradient_checkpointing,
        recipe.offload_activations, resume_adapter=None if last is None else last / "adapter",
        attn_implementation=recipe.model.attn_implementation,
        tiled_mlp=plan.tiled_mlp, tiled_norms=plan.tiled_norms, tile_tokens=plan.tile_tokens,
    )
    # after any resume: the optimizer must hold the installed tensors
    groups = param_groups(model, recipe.optimizer, recipe.lora.loraplus_ratio)
    o, s = recipe.optimizer, recipe.schedule
    opt = build_optimizer(groups, o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    sched = build_scheduler(opt, total_steps, s.warmup_steps, s.name, s.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type) if plan.autocast_dtype == torch.float16 else None
    params = [p for g in groups for p in g["params"]]
    chunk = CHUNK_TOKENS if recipe.chunked_loss else None
    run = _Run(recipe, plan, device, out, data, model, save, opt, sched, scaler, params, total_steps, chunk, last)
    return run, state


def _restore(run: _Run, state: dict | None, say: Callable[[str], None]) -> int:
    """Load a checkpoint's optimizer, scheduler, scaler and RNG state into ``run``; returns its step (0 for none)."""
    if state is None:
        return 0
    saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    built = [len(g["params"]) for g in run.opt.param_groups]
    if saved != built:  # e.g. a checkpoint of an earlier qlora, which kept all adapter tensors in one group
        raise InputError(
            f"Checkpoint {str(run.checkpoint)!r} holds optimizer state for parameter groups of {saved} tensors, "
            f"but this run builds groups of {built} (A, B and DoRA magnitudes apart). It was written by an earlier "
            f"qlora or with other LoRA settings, so it cannot be resumed exactly. Resume it with the qlora and "
            f"recipe that wrote it, or start afresh in a new output_dir."
        )
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    ckpts.set_rng_state(state["rng"])
    step = int(state["step"])
    if step >= run.total_steps:
        say(f"{run.out} already holds a finished run ({run.checkpoint.name}); writing its adapter and plots again")
    else:
        say(f"resuming from {run.checkpoint} (step {step} of {run.total_steps})")
    return step


def _rows_of_step(run: _Run, step: int) -> list[int]:
    """Rows of a step: the g-th sequence of the run is a pure function of (g, seed), so resume replays it."""
    per_step, n = run.recipe.micro_batch_size * run.plan.grad_accum, len(run.data.row_targets)
    return [_epoch_order(n, g // n, run.recipe.seed)[g % n] for g in range(step * per_step, (step + 1) * per_step)]


def _optimizer_step(run: _Run, step: int) -> StepStats:
    """Step ``step + 1``: forward/backward over its micro-batches, clip, optimizer and scheduler step.

    When the loss is not finite the optimizer step is skipped and the
    gradients are dropped, so the parameters stay those of the last good
    step; the returned ``loss`` tells the caller.
    """
    t0 = time.time()
    micro, r = run.recipe.micro_batch_size, run.recipe
    ids = _rows_of_step(run, step)
    parts = [ids[m * micro:(m + 1) * micro] for m in range(run.plan.grad_accum)]
    counts = [sum(run.data.row_targets[i] for i in p) for p in parts]  # host ints: no device read-back
    micro_batches = [_batch(run.data.rows, p, run.device) for p in parts]
    mean_loss = accumulate_gradients(run.model, micro_batches, run.chunk, run.plan.autocast_dtype, run.scaler, counts)
    if run.scaler is not None:
        run.scaler.unscale_(run.opt)
    diag = {}
    if r.diagnostics_steps and (step + 1) % r.diagnostics_steps == 0:
        # before zero_grad: the grad-norm ratio needs the grads. Reads norms back module by module
        # (host syncs), which is why it runs every diagnostics_steps, not every step.
        diag = diagnostics_fn(run.model)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, r.max_grad_norm or float("inf"))
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
    run.opt.zero_grad(set_to_none=True)
    peak, kind = peak_memory(run.device)
    return StepStats(loss, lr, grad_norm, sum(counts), len(ids) * r.seq_len, time.time() - t0, peak, kind, diag)


def _save(run: _Run, step: int) -> Path:
    """A checkpoint of ``step`` (adapter, optimizer, scheduler, scaler, RNG, resolved recipe)."""
    st = {"step": step, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
          "rng": ckpts.rng_state()}
    if run.scaler is not None:
        st["scaler"] = run.scaler.state_dict()
    resolved = recipe_to_dict(run.recipe)
    return ckpts.save_checkpoint(run.out, step, run.save_adapter, st, resolved, run.recipe.keep_checkpoints)


def _eval_record(run: _Run) -> dict:
    ev = evaluate(run.model, run.data.eval_rows, run.recipe.micro_batch_size, run.chunk, run.plan.autocast_dtype,
                  run.device)
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
    with torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
        score = evaluate_task(run.model, run.plan.tokenizer, run.data.eval_tasks[: t.examples], t.max_new_tokens,
                              t.batch_size)
    run.model.train(was_training)
    result.task_scores.append((step, score))
    prompt, reply, reference = score.samples[0]
    say(f"step {step}: {score.summary()}\n  sample prompt: {prompt.splitlines()[-1]}\n  reply:    {reply}\n"
        f"  expected: {reference}")
    rec = {"task_exact_match": score.exact_match}
    return rec if score.valid_json is None else rec | {"task_valid_json": score.valid_json}


def _log(run: _Run, metrics: MetricsLog, window: LogWindow, bar, step: int, extra: dict | None = None) -> None:
    """Write the window's train record for ``step`` (plus ``extra``, e.g. eval) to the log and the bar."""
    rec = window.record(step, run.plan.predicted_peak_bytes)
    rec.update(extra or {})
    metrics.write(rec)
    if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                        peak=f"{rec['peak_bytes'] / 2**30:.2f}G", refresh=False)


def _finish(run: _Run, metrics: MetricsLog, result: TrainResult, say: Callable[[str], None]) -> None:
    """Final adapter (finished runs only), the eval summary, then metrics and plots (always)."""
    if result.stopped == "done":
        run.save_adapter(run.out)  # the checkpoints' own writer: file by file into output_dir, weights first
        if run.data.eval_rows is not None and result.eval_losses:
            first = next((r["eval_loss"] for r in metrics.records if r.get("step") == 0 and "eval_loss" in r), None)
            say(f"eval loss: {first if first is None else round(first, 4)} at step 0 -> "
                f"{result.eval_losses[-1][1]:.4f} at step {result.steps}")
        if len(result.task_scores) == 2:
            (a, before), (b, after) = result.task_scores
            say(f"task exact match: {before.exact_match:.1%} at step {a} -> {after.exact_match:.1%} at step {b}")
        say(f"adapter written to {run.out} (PEFT format)")
    metrics.close()
    try:
        plot_run(metrics.records, run.out)
    except Exception as e:  # plotting must never lose a finished run
        log.warning("could not write plots: %s", e)


def train(recipe: Recipe, say: Callable[[str], None] = print, progress: bool = True,
          signal_at: tuple[int, int] | None = None) -> TrainResult:
    """Run (or resume) the fine-tuning a recipe describes; ``recipe`` itself is not modified.

    Train records go to metrics.jsonl every ``recipe.log_steps`` steps, and
    always at an eval or checkpoint step, the last step and before a stop;
    starting intervals afresh at each checkpoint keeps a run resumed from a
    periodic checkpoint logging exactly what an uninterrupted one does (a
    stop by signal, NaN or OOM writes its partial interval first).

    Args:
        signal_at: test/debug hook ``(step, signum)``: after that step is logged and checkpointed,
            the process sends itself ``signum`` (``signal.raise_signal``, delivered before it returns).

    Raises:
        InputError: bad recipe values, data or model folder; a run the planner
            predicts will not fit (the message carries its suggestions).
    """
    t0 = time.time()
    run, state = _setup(recipe, say)
    start = _restore(run, state, say)
    del state  # the optimizer holds its own copy now
    r, eval_rows = run.recipe, run.data.eval_rows
    run.out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run.out / "metrics.jsonl", resume_step=start)
    result = TrainResult(run.out, start, "done", start if run.checkpoint is not None else None)
    if start == 0 and eval_rows is not None:
        ev = _eval_record(run)
        say(f"step 0: eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})")
        metrics.write({"step": 0, **ev, **_task_record(run, 0, result, say)})
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    window, bar, step = LogWindow(), progress_bar(progress, run.total_steps, start), start
    run.model.train()
    with _Stop() as stop:
        try:
            while step < run.total_steps:
                stats = _optimizer_step(run, step)
                if not math.isfinite(stats.loss):
                    if window:
                        _log(run, metrics, window, bar, step)
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
                ev = _eval_record(run) if eval_rows is not None and (step % r.eval_steps == 0 or last) else None
                if ev is not None:
                    result.eval_losses.append((step, ev["eval_loss"]))
                task = _task_record(run, step, result, say) if last else {}
                if ev is not None or saving or last or step % r.log_steps == 0:
                    _log(run, metrics, window, bar, step, {**(ev or {}), **task})
                if saving or last:
                    _save(run, step)  # the last one too: re-running a finished run then has nothing to redo
                if signal_at is not None and step == signal_at[0]:
                    signal.raise_signal(signal_at[1])  # test/debug hook; a SIGTERM handler has run when this returns
                if stop.signum is not None:
                    if window:
                        _log(run, metrics, window, bar, step)
                    path = _save(run, step)
                    name = signal.Signals(stop.signum).name
                    say(f"received {name}: saved {path}; re-run the same command to resume.")
                    result.stopped, result.exit_code = "signal", 128 + stop.signum
                    break
        except torch.OutOfMemoryError:
            run.opt.zero_grad(set_to_none=True)
            if window:
                _log(run, metrics, window, bar, step)
            peak, kind = peak_memory(run.device)
            path = _save(run, step)
            say(
                f"error: out of memory at step {step + 1}. The planner predicted a peak of "
                f"{run.plan.predicted_peak_bytes / 2**30:.2f} GiB; measured so far {peak / 2**30:.2f} GiB ({kind}). "
                f"The state before this step is saved in {path}. Lower micro_batch_size or seq_len, or use "
                f"'qlora plan' to pick settings; qlora does not shrink the batch silently."
            )
            result.stopped, result.exit_code = "oom", EXIT_OOM
        finally:
            if bar is not None:
                bar.close()
    result.steps = step
    _finish(run, metrics, result, say)
    result.wall_s = time.time() - t0
    return result
