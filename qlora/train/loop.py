"""The training loop: one readable function, no Trainer class.

recipe -> plan (resolve ``auto``, refuse what cannot fit) -> data -> NF4 base
(streamed) -> LoRA -> loop (autocast forward, checkpointed layers,
token-normalized loss over the whole accumulation group, backward, clip,
optimizer step) -> checkpoints (atomic) -> final adapter, metrics, plots.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qlora.train import checkpoints as ckpts
from qlora.data import IGNORE, epoch_order, load_records, pack_rows, split_eval, tokenize_dataset
from qlora.train.loss import causal_lm_loss
from qlora.train.metrics import MetricsLog, plot_run
from qlora.train.optim import build_optimizer, build_scheduler
from qlora.train.recipe import Recipe, recipe_to_dict
from qlora.train.loss import CHUNK_TOKENS
from qlora.train.plan import RunPlan, plan_run
from qlora.train.setup import build_model, diagnostics_fn, param_groups, resolve_device

log = logging.getLogger(__name__)

EXIT_OOM, EXIT_NAN, EXIT_SIGNAL = 3, 4, 130


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    stopped: str  # "done", "signal", "oom", "nan"
    resumed_from: int | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    exit_code: int = 0


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


def _batch(rows: dict, idx: list[int], device: torch.device) -> dict:
    return {k: v[idx].to(device, non_blocking=True) for k, v in rows.items()}


def _targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def forward_loss(model, batch: dict, chunk_tokens: int | None, autocast_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Summed loss over one micro-batch and its target-token count.

    ``chunk_tokens`` set: :func:`qlora.train.loss.causal_lm_loss` on the final
    hidden states (never materializes all logits). ``None``: transformers'
    own loss on full fp32 logits (the standard path), asked for a sum through
    ``num_items_in_batch`` so that normalization stays with the caller.
    """
    device_type = batch["input_ids"].device.type
    n = _targets(batch["labels"])
    with torch.autocast(device_type, dtype=autocast_dtype):
        if chunk_tokens is None:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False, num_items_in_batch=max(n, 1))
            return out.loss * max(n, 1), n
        out = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return causal_lm_loss(out[0], model.get_output_embeddings().weight, batch["labels"], chunk_tokens, softcap)


def accumulate_gradients(model, micro_batches: list[dict], chunk_tokens: int | None, autocast_dtype: torch.dtype, scaler=None) -> float:
    """Forward/backward every micro-batch of one optimizer step; returns the step's mean loss.

    Each micro-batch's summed loss is divided by the target-token count of
    the *whole* step, so the accumulated gradient equals that of one big
    batch however the step is split into micro-batches.
    """
    n_targets = max(1, sum(_targets(b["labels"]) for b in micro_batches))
    total = 0.0
    for b in micro_batches:
        loss_sum, _ = forward_loss(model, b, chunk_tokens, autocast_dtype)
        loss = loss_sum / n_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss_sum.detach())
    return total / n_targets


@torch.no_grad()
def evaluate(model, rows: dict, micro_batch: int, chunk_tokens: int | None, autocast_dtype, device) -> float:
    """Token-weighted mean eval loss (nats/token) over all eval rows."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for start in range(0, rows["input_ids"].shape[0], micro_batch):
        idx = list(range(start, min(start + micro_batch, rows["input_ids"].shape[0])))
        loss, k = forward_loss(model, _batch(rows, idx, device), chunk_tokens, autocast_dtype)
        total += float(loss)
        n += k
    model.train(was_training)
    return total / max(n, 1)


def _peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS"


def _write_final_adapter(save: Callable[[Path], None], out: Path) -> None:
    """Write the final adapter files into ``out`` without ever exposing a half-written file."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-adapter-", dir=out))
    try:
        save(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(recipe: Recipe, say: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Run (or resume) the fine-tuning a recipe describes.

    Raises:
        InputError: bad recipe values, data or model folder; a run the planner
            predicts will not fit (the message carries its suggestions).
    """
    t0 = time.time()
    device = resolve_device(recipe.device)
    out = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)

    plan: RunPlan = plan_run(recipe, device)  # before any weights are read
    say(plan.summary)
    seq_len, micro, accum = plan.seq_len, plan.micro_batch_size, plan.grad_accum
    recipe.seq_len, recipe.micro_batch_size, recipe.lora.rank = seq_len, micro, plan.rank

    tokenizer = plan.tokenizer
    ds, source = load_records(recipe.data.path)
    fields = dict(
        train_on=recipe.data.train_on, text_field=recipe.data.text_field, instruction_field=recipe.data.instruction_field,
        input_field=recipe.data.input_field, output_field=recipe.data.output_field, messages_field=recipe.data.messages_field,
    )
    examples, stats = tokenize_dataset(ds, source, tokenizer, recipe.data.format, seq_len, **fields)
    if recipe.data.eval_path:
        eds, esrc = load_records(recipe.data.eval_path)
        train_ex, eval_ex = examples, tokenize_dataset(eds, esrc, tokenizer, recipe.data.format, seq_len, **fields)[0]
    else:
        train_ex, eval_ex = split_eval(examples, recipe.data.eval_fraction, recipe.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = pack_rows(train_ex, seq_len, pad, recipe.data.packing)
    eval_rows = pack_rows(eval_ex, seq_len, pad, recipe.data.packing) if eval_ex else None
    n_rows = rows["input_ids"].shape[0]
    say(
        f"data: {stats.examples} examples from {source} ({stats.truncated} truncated to {seq_len} tokens, "
        f"{stats.dropped} dropped with no targets left); {n_rows} train rows, "
        f"{0 if eval_rows is None else eval_rows['input_ids'].shape[0]} eval rows"
    )
    per_step = micro * accum
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * n_rows / per_step))

    last = ckpts.latest_checkpoint(out)
    state = ckpts.load_trainer_state(last) if last is not None else None
    model, save_adapter_to = build_model(recipe, plan, device, resume_adapter=None if last is None else last / "adapter")
    groups = param_groups(model, recipe.optimizer, recipe.lora.loraplus_ratio)  # after any resume: the optimizer must hold the installed tensors
    opt = build_optimizer(groups, recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay,
                          tuple(recipe.optimizer.betas), recipe.optimizer.eps)
    sched = build_scheduler(opt, total_steps, recipe.schedule.warmup_steps, recipe.schedule.name, recipe.schedule.min_lr_ratio)
    autocast_dtype = plan.autocast_dtype
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    chunk = CHUNK_TOKENS if recipe.chunked_loss else None

    start_step, resumed = 0, None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        ckpts.set_rng_state(state["rng"])
        start_step = resumed = int(state["step"])
        if start_step >= total_steps:
            say(f"{out} already holds a finished run ({last.name}); writing its adapter and plots again")
        else:
            say(f"resuming from {last} (step {start_step} of {total_steps})")
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step)
    result = TrainResult(out, start_step, "done", resumed)
    resolved = recipe_to_dict(recipe)

    def save_ckpt(step: int) -> Path:
        st = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpts.rng_state()}
        if scaler is not None:
            st["scaler"] = scaler.state_dict()
        return ckpts.save_checkpoint(out, step, save_adapter_to, st, resolved, recipe.keep_checkpoints)

    if start_step == 0 and eval_rows is not None:
        ev = evaluate(model, eval_rows, micro, chunk, autocast_dtype, device)
        metrics.write({"step": 0, "eval_loss": ev, "eval_ppl": math.exp(min(ev, 50))})
        say(f"step 0: eval loss {ev:.4f} (ppl {math.exp(min(ev, 50)):.2f})")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    orders: dict[int, list[int]] = {}  # epoch -> row order, built once per epoch (not per sample)

    def row_at(g: int) -> int:
        """Row of the g-th sequence of the run: a pure function of (g, seed), so resume replays it."""
        epoch = g // n_rows
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(n_rows, epoch, recipe.seed)
        return orders[epoch][g % n_rows]

    params = [p for g in groups for p in g["params"]]
    bar = _progress(progress, total_steps, start_step)
    model.train()
    step = start_step
    with _Stop() as stop:
        try:
            while step < total_steps:
                t_step = time.time()
                ids = [row_at(step * per_step + j) for j in range(per_step)]
                micro_batches = [_batch(rows, ids[m * micro : (m + 1) * micro], device) for m in range(accum)]
                n_targets = sum(_targets(b["labels"]) for b in micro_batches)
                mean_loss = accumulate_gradients(model, micro_batches, chunk, autocast_dtype, scaler)
                if not math.isfinite(mean_loss):
                    opt.zero_grad(set_to_none=True)
                    path = save_ckpt(step)  # parameters are still those of the last good step
                    say(f"error: the loss became {mean_loss} at step {step + 1}; stopped. The last good state is saved in {path}. "
                        f"Lower optimizer.lr, raise schedule.warmup_steps, or check the data.")
                    result.stopped, result.exit_code = "nan", EXIT_NAN
                    break
                if scaler is not None:
                    scaler.unscale_(opt)
                diag = {}
                if recipe.diagnostics_steps and (step + 1) % recipe.diagnostics_steps == 0:
                    diag = diagnostics_fn(model)  # before zero_grad: the grad-norm ratio needs the grads
                gnorm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or float("inf"))
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                lr = sched.get_last_lr()[0]
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.time() - t_step
                peak, kind = _peak(device)
                rec = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(gnorm), "tokens": n_targets,
                       "tok_per_s": per_step * seq_len / dt, "peak_bytes": peak, "peak_kind": kind,
                       "predicted_peak_bytes": plan.predicted_peak_bytes}
                rec.update(diag)
                if eval_rows is not None and (step % recipe.eval_steps == 0 or step == total_steps):
                    ev = evaluate(model, eval_rows, micro, chunk, autocast_dtype, device)
                    rec.update(eval_loss=ev, eval_ppl=math.exp(min(ev, 50)))
                    result.eval_losses.append((step, ev))
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                                    peak=f"{peak / 2**30:.2f}G", refresh=False)
                    bar.update(1)
                if step % recipe.save_steps == 0 or step == total_steps:
                    save_ckpt(step)  # the last one too: re-running a finished run then has nothing to redo
                if stop.signum is not None:
                    path = save_ckpt(step)
                    say(f"received {signal.Signals(stop.signum).name}: saved {path}; re-run the same command to resume.")
                    result.stopped, result.exit_code = "signal", EXIT_SIGNAL
                    break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            peak, kind = _peak(device)
            path = save_ckpt(step)
            say(
                f"error: out of memory at step {step + 1}. The planner predicted a peak of "
                f"{plan.predicted_peak_bytes / 2**30:.2f} GiB; measured so far {peak / 2**30:.2f} GiB ({kind}). "
                f"The state before this step is saved in {path}. Lower micro_batch_size or seq_len, or use "
                f"'qlora plan' to pick settings; qlora does not shrink the batch silently."
            )
            result.stopped, result.exit_code = "oom", EXIT_OOM
        finally:
            if bar is not None:
                bar.close()
    result.steps = step
    if result.stopped == "done":
        _write_final_adapter(save_adapter_to, out)
        if eval_rows is not None and result.eval_losses:
            first = next((r["eval_loss"] for r in metrics.records if r.get("step") == 0 and "eval_loss" in r), None)
            say(f"eval loss: {first if first is None else round(first, 4)} at step 0 -> {result.eval_losses[-1][1]:.4f} at step {step}")
        say(f"adapter written to {out} (PEFT format)")
    metrics.close()
    try:
        plot_run(metrics.records, out)
    except Exception as e:  # plotting must never lose a finished run
        log.warning("could not write plots: %s", e)
    result.wall_s = time.time() - t0
    return result


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
