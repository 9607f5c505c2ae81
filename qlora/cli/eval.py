"""``qlora eval --base MODEL [--adapter DIR] --data FILE``: eval loss, perplexity and the task metric.

The loss is the trainer's own (:func:`qlora.train.step.evaluate`): summed
over every target token of the file (what training would learn from it) and
divided by their number, in nats/token. For chat and instruction data the
task metric (:func:`qlora.tasks.evaluate_task`) then answers each prompt
greedily and compares the reply with the reference.
"""

from __future__ import annotations

import argparse
import json
import math

from quant.errors import InputError


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Evaluate a base model (4-bit by default), optionally with an adapter, on a local data file: "
        "the eval loss and perplexity over its target tokens and, for chat or instruction data, the share of "
        "greedy replies that match the reference (JSON references are compared after parsing).",
    )
    p.add_argument("--base", required=True,
                   help="base model: a folder (16-bit or bnb-4bit), a .gguf file, or builtin:tiny-llama")
    p.add_argument("--adapter", help="PEFT-format adapter folder (e.g. a training output_dir)")
    p.add_argument("--data", required=True, help="local .jsonl/.json/.csv/.parquet/.txt file or builtin:NAME")
    p.add_argument("--format", default="auto", choices=["auto", "chat", "instruction", "text"],
                   help="record format (default: from the column names)")
    p.add_argument("--seq-len", type=int, help="truncate examples to this many tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass and prompts per generate call")
    p.add_argument("--max-examples", type=int, help="use only the first N records")
    p.add_argument("--task", action=argparse.BooleanOptionalAction, default=None,
                   help="score greedy replies against the references (default: on for chat/instruction data)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit for the task metric")
    p.add_argument("--quant-type", default=None, choices=["nf4", "fp4", "none"],
                   help="how the base is loaded: 4-bit NF4, FP4, or none (16-bit); default: the base the adapter "
                   "records it was trained on, else nf4")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _check(args) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--seq-len", args.seq_len), ("--max-examples", args.max_examples)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be > 0, got {value}.")


def run(args) -> int:
    from transformers import AutoTokenizer

    from qlora.adapters.files import load_adapter, read_adapter
    from qlora.adapters.record import serving_format
    from qlora.builtin_models import resolve_model_dir
    from qlora.data import detect_format, load_records, pack_rows, tokenize_dataset
    from qlora.tasks import TASK_FORMATS, evaluate_task, task_examples
    from qlora.train.loss import CHUNK_TOKENS
    from qlora.train.precision import autocast_dtype_for
    from qlora.train.setup import resolve_device, row_targets
    from qlora.train.step import evaluate
    from quant.loading import load_quantized_model

    _check(args)
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.base)
    # the data is read and checked before the model, so a bad file fails in a second
    ds, source = load_records(args.data)
    if args.max_examples is not None:
        ds = ds.select(range(min(args.max_examples, len(ds))))
    fmt = detect_format(ds.column_names, args.format, "text", "instruction", "messages", source)
    if args.task and fmt not in TASK_FORMATS:
        raise InputError(
            f"--task needs prompts with reference replies, but {source!r} is {fmt!r} data; "
            f"give chat or instruction records, or drop --task."
        )
    task = fmt in TASK_FORMATS if args.task is None else args.task
    examples = task_examples(ds, fmt) if task else []
    tok = AutoTokenizer.from_pretrained(model_dir)
    record = read_adapter(args.adapter).base if args.adapter else None
    model = load_quantized_model(model_dir, device, **serving_format(record, args.quant_type))
    if args.adapter:
        load_adapter(model, args.adapter)
    seq_len = args.seq_len or int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    exs, stats = tokenize_dataset(ds, source, tok, fmt, seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # one example per row, padded to the longest: no packing, and no row wider than the data needs
    rows = pack_rows(exs, max(len(e.input_ids) for e in exs), pad, packing=False)
    loss = evaluate(model, rows, args.batch_size, CHUNK_TOKENS, autocast_dtype_for(device, "bfloat16"), device)
    result = {
        "data": source, "format": fmt, "examples": len(exs), "truncated": stats.truncated,
        "target_tokens": sum(row_targets(rows)), "eval_loss": loss, "perplexity": math.exp(loss), "task": None,
    }
    if task:
        ts = evaluate_task(model, tok, examples, args.max_new_tokens, args.batch_size)
        prompt, reply, reference = ts.samples[0]
        result["task"] = {"n": ts.n, "exact_match": ts.exact_match, "valid_json": ts.valid_json,
                          "json_n": ts.json_n, "summary": ts.summary(),
                          "sample": {"prompt": prompt, "reply": reply, "reference": reference}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"data: {source} ({fmt}): {result['examples']} examples ({stats.truncated} truncated to {seq_len} tokens), "
          f"{result['target_tokens']} target tokens")
    print(f"eval loss {loss:.4f} nats/token, perplexity {result['perplexity']:.3f}")
    if task:
        s = result["task"]["sample"]
        print(result["task"]["summary"])
        print(f"sample prompt: {s['prompt']!r}\nsample reply: {s['reply']!r}\nsample reference: {s['reference']!r}")
    return 0
