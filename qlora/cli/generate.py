"""``qlora generate --base MODEL [--adapter [NAME=]DIR ...] (--prompt TEXT | --prompts FILE.jsonl)``.

Answers prompts with the 4-bit base and its adapters. Replies stop at the end of the assistant turn
(:func:`qlora.generation.end_of_turn_ids`).

- ``--prompt`` (repeatable): with at most one adapter; replies are streamed to stdout token by token
  unless ``--no-stream``.
- ``--prompts FILE.jsonl``: one JSON object per line, ``{"prompt": text or [turns], "adapter": NAME or
  null}``; prompts for different adapters are batched together (:mod:`qlora.adapters.routing`).
  Each finished batch is printed as JSONL lines ``{index, adapter, prompt, reply}`` (plus any other keys
  of the input line), or, with ``--output``, the file is written atomically in prompt order at the end.

Everything the user gives (the adapters' files, their bases, every prompt line, the output path) is
checked before the model is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quant.errors import InputError, choices


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Generate text from the 4-bit base model, optionally with trained adapters, using the "
        "tokenizer's chat template when it has one. Each reply stops at the end of the assistant's turn. With "
        "--prompts, prompts for different adapters are batched together.",
    )
    p.add_argument("--base", required=True,
                   help="base model: a folder (16-bit or bnb-4bit), a .gguf file, or builtin:tiny-llama")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="PEFT-format adapter folder (e.g. a training output_dir); repeat as NAME=DIR for several, "
                   "which the lines of --prompts name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="user message; repeat for several prompts")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help='one JSON object per line: {"prompt": "..." or [{"role", "content"}, ...], '
                     '"adapter": "NAME" or null for the base}')
    p.add_argument("--output", metavar="FILE.jsonl",
                   help="write the replies there as JSONL, in prompt order, atomically once all are done "
                   "(default: print them as they finish)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch, across adapters (16)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--no-stream", action="store_true",
                   help="with --prompt: print each reply when it is complete (all prompts batched) instead of "
                   "token by token")
    p.add_argument("--quant-type", default=None, choices=["nf4", "fp4", "none"],
                   help="how the base is loaded: 4-bit NF4, FP4, or none (16-bit); default: the base the adapters "
                   "record they were trained on, else nf4")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _adapter_args(values: list[str]) -> list[tuple[str, str]]:
    """``--adapter`` values as ``(name, dir)``; an unnamed one (a bare DIR) is ``default`` and must be alone.

    A value with ``=`` is ``NAME=DIR`` unless the whole value is an existing path (a folder whose name
    holds ``=``).

    Raises:
        InputError: an empty name or folder, a name given twice, or an unnamed adapter next to others.
    """
    out: list[tuple[str, str]] = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or Path(v).exists():
            if len(values) > 1:
                raise InputError(f"--adapter {v}: with several adapters each needs a name, as --adapter NAME=DIR, "
                                 "so that the lines of --prompts can name it.")
            name, folder = "default", v
        if not name or not folder:
            raise InputError(f"--adapter {v!r}: expected NAME=DIR (or DIR alone for a single adapter).")
        if name in (n for n, _ in out):
            raise InputError(f"--adapter {v}: the name {name!r} is given twice; give each adapter its own name.")
        out.append((name, folder))
    return out


def _read_prompts(path: str, names: list[str], chat: bool) -> list[dict]:
    """The lines of a ``--prompts`` file as dicts with ``prompt`` and ``adapter`` (a loaded name or None).

    Blank lines are skipped. A line without ``adapter`` takes the only adapter when exactly one is given,
    the base when none is.

    Raises:
        InputError: naming the line and the value: not a JSON object, a missing, empty or malformed
            prompt, a conversation with --no-chat-template, an adapter name no --adapter gives, or no
            adapter key while several adapters are loaded; a file that cannot be read or holds no prompt.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path}: cannot read it ({e}).") from None
    valid = (choices(names) + ", or null for the base") if names else "none (no --adapter given); use null"
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--prompts {path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where} is not valid JSON ({e.msg}): {line[:80]!r}.") from None
        if not isinstance(row, dict):
            raise InputError(f'{where} is {line[:80]!r}; each line is an object such as {{"prompt": "...", '
                             '"adapter": "NAME"}.')
        prompt = row.get("prompt")
        turns_ok = isinstance(prompt, list) and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in prompt
        )
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError(f"{where} has an empty prompt {prompt!r}; every line needs text to answer.")
        elif not turns_ok or not prompt:
            raise InputError(f'{where}: "prompt" must be a non-empty string or a list of {{"role", "content"}} '
                             f"turns, got {prompt!r}.")
        elif not chat:
            raise InputError(f"{where} gives a conversation (a list of turns), which needs the chat template; "
                             "drop --no-chat-template or give the prompt as text.")
        if "adapter" not in row:
            if len(names) > 1:
                raise InputError(f'{where} names no "adapter"; with several adapters every line names one of '
                                 f"{valid}.")
            row["adapter"] = names[0] if names else None
        elif row["adapter"] is not None and row["adapter"] not in names:
            raise InputError(f"{where} names the adapter {row['adapter']!r}, which no --adapter gives; valid: "
                             f"{valid}.")
        rows.append(row)
    if not rows:
        raise InputError(f"--prompts {path} holds no prompt (one JSON object per line).")
    return rows


def _check_output(args) -> None:
    if args.output is None:
        if args.overwrite:
            raise InputError("--overwrite replaces an existing --output file; give --output FILE.jsonl too.")
        return
    out = Path(args.output)
    if args.prompts and out.resolve() == Path(args.prompts).resolve():
        raise InputError(f"--output {args.output} is the --prompts file itself; write the replies elsewhere.")
    if out.is_dir():
        raise InputError(f"--output {args.output} is a folder; give a file path such as replies.jsonl.")
    if out.exists() and not args.overwrite:
        raise InputError(f"--output {args.output} exists; pass --overwrite to replace it (it is replaced only "
                         "once every reply is in), or choose another path.")


def _load_adapters(pairs: list[tuple[str, str]]) -> list:
    """The adapter files, read and validated; errors name the ``--adapter`` they come from."""
    from qlora.adapters.files import read_adapter

    read = []
    for name, folder in pairs:
        try:
            read.append(read_adapter(folder))
        except InputError as e:
            raise InputError(f"--adapter {name}={folder}: {e}") from None
    return read


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from qlora.adapters.multi import add_adapter
    from qlora.adapters.record import common_record, serving_format
    from qlora.builtin_models import resolve_model_dir
    from qlora.generation import prompt_ids
    from qlora.train.setup import resolve_device
    from quant.loading import load_quantized_model

    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise InputError(f"--max-new-tokens and --batch-size must be > 0, got {args.max_new_tokens} and "
                         f"{args.batch_size}.")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature} and {args.top_p}.")
    pairs = _adapter_args(args.adapter)
    names = [n for n, _ in pairs]
    if args.prompt and len(pairs) > 1:
        raise InputError(f"{len(pairs)} adapters were given with --prompt; to ask several adapters, put the prompts "
                         'in a --prompts FILE.jsonl whose lines name each one\'s adapter ({"prompt": ..., '
                         '"adapter": NAME}).')
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise InputError(f"--prompt {next(p for p in args.prompt if not p.strip())!r} is empty; give text to answer.")
    _check_output(args)
    rows = (_read_prompts(args.prompts, names, not args.no_chat_template) if args.prompts
            else [{"prompt": p, "adapter": names[0] if names else None} for p in args.prompt])
    read = _load_adapters(pairs)
    record = common_record([a.base for a in read], [f"--adapter {n}={d}" for n, d in pairs], verb="serve")

    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.base)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for i, row in enumerate(rows):
        try:
            ids.append(prompt_ids(tok, row["prompt"], chat=not args.no_chat_template))
        except InputError as e:
            raise InputError(f"prompt {i + 1} ({str(row['prompt'])[:60]!r}): {e}") from None
    model = load_quantized_model(model_dir, device, **serving_format(record, args.quant_type))
    for (name, folder), adapter in zip(pairs, read):
        try:
            add_adapter(model, name, adapter)
        except InputError as e:  # e.g. trained on another model: the shapes do not fit this base
            raise InputError(f"--adapter {name}={folder} does not fit --base {args.base}: {e}") from None
    torch.manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              batch_size=args.batch_size, adapters=[r["adapter"] for r in rows])
    if args.prompts or args.output:
        _write_replies(model, tok, ids, rows, kw, args.output)
    else:
        _print_replies(model, tok, ids, rows, kw, stream=not args.no_stream)
    return 0


def _write_replies(model, tok, ids, rows, kw, output) -> None:
    """JSONL, a line per reply: printed as each batch finishes, or written to ``output`` in order at the end."""
    from qlora.generation import generate_batches
    from quant.files import write_text_atomic

    def line(i: int, reply: str) -> str:
        return json.dumps({**rows[i], "index": i, "adapter": rows[i]["adapter"], "prompt": rows[i]["prompt"],
                           "reply": reply}, ensure_ascii=False)

    done: dict[int, str] = {}
    for i, reply in generate_batches(model, tok, ids, **kw):
        if output is None:
            print(line(i, reply), flush=True)
        else:
            done[i] = line(i, reply)
    if output is not None:
        write_text_atomic(output, "".join(done[i] + "\n" for i in range(len(rows))))
        print(f"wrote {len(rows)} replies to {output}", file=sys.stderr)


def _print_replies(model, tok, ids, rows, kw, stream: bool) -> None:
    """``> prompt`` then the reply, for ``--prompt``: token by token through a streamer, or batched."""
    from transformers import TextStreamer

    from qlora.generation import generate

    if not stream:
        for row, reply in zip(rows, generate(model, tok, ids, **kw)):
            print(f"> {row['prompt']}\n{reply.strip()}\n", flush=True)
        return
    for row, one in zip(rows, ids):
        print(f"> {row['prompt']}", flush=True)
        # the streamer prints decoded text as tokens arrive and ends the reply with a newline
        generate(model, tok, [one], streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                 **(kw | {"adapters": [row["adapter"]]}))
        print(flush=True)
