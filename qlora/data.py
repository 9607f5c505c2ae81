"""Data: local files -> token ids with a loss mask -> fixed-length (packed) rows.

Every row the trainer sees is exactly ``seq_len`` tokens: several examples
packed back to back, or one example, followed by padding. Each example's
``position_ids`` restart at 0 and the attention mask is left ``None``;
with no KV cache (``use_cache=False``, as in training) transformers (>= 4.54)
turns restarting position ids into a block-diagonal causal mask for sdpa,
eager and flash-attention alike, so **no token attends across an example
boundary** (tests check logits against each example run alone). With a
cache, transformers skips that detection, so never pack for generation.
Trailing padding carries no loss and continues the last example's positions
(it is not a segment of its own; :func:`pack_rows` says why). Fixed-size rows
also make the memory planner's ``micro_batch x seq_len`` exact.

Labels use -100 for tokens without loss: prompts and system/user turns by
default (``train_on="completion"``), nothing with ``train_on="all"``. An
assistant turn's targets end with the token generation stops at
(:func:`qlora.generation.end_of_turn_ids`), so a trained model ends its turns.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.generation import end_of_turn_ids, prompt_ids
from qlora.quiet import library_bars_off
from qlora.train.loss import IGNORE
from quant.errors import InputError, choices

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_DATA = {  # scripts/make_tiny_assets.py and scripts/make_task_data.py write these
    "tiny-chat": ASSETS / "data" / "tiny-chat.jsonl", "tiny-text": ASSETS / "data" / "tiny-text.txt",
    "people-json": ASSETS / "data" / "people-json.jsonl",
    "people-json-eval": ASSETS / "data" / "people-json-eval.jsonl",
}
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# roles some templates name besides the four (Llama-3.1's ipython, OpenAI-style developer, older function)
_ROLE_WORDS = {"ipython", "developer", "function", "tool_response", "tool_call"}
_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (IGNORE where no loss), same length.

    ``row`` is the index of the source record in its dataset (set by :func:`tokenize_dataset`;
    -1 for an example built by hand), so a held-out example can be traced back to its record.
    """

    input_ids: list[int]
    labels: list[int]
    row: int = -1


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    target_tokens: int = 0


def resolve_path(path: str) -> Path:
    """``builtin:NAME`` -> the shipped file; anything else -> a local path that must exist.

    Raises:
        InputError: unknown builtin name or a missing path.
    """
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_DATA:
            raise InputError(f"Unknown builtin dataset {name!r}; valid choices are {choices(sorted(BUILTIN_DATA))}.")
        return BUILTIN_DATA[name]
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(
            f"Data path {path!r} does not exist. Give a local .jsonl/.json/.csv/.parquet/.txt file or a folder "
            "written by datasets' save_to_disk; nothing is downloaded."
        )
    return p


def load_records(path: str):
    """Load a local dataset with the ``datasets`` library (never downloads).

    Returns:
        (datasets.Dataset, display name of the source)

    Raises:
        InputError: missing path, unsupported extension, unreadable or empty data.
    """
    import datasets

    p = resolve_path(path)
    try:
        if p.is_dir():
            if not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
                raise InputError(
                    f"Folder {str(p)!r} is not a dataset saved with save_to_disk (no dataset_info.json/state.json)."
                )
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise InputError(f"Dataset folder {str(p)!r} has splits {list(ds)} but no 'train' split.")
                ds = ds["train"]
        else:
            kind = _LOADERS.get(p.suffix.lower())
            if kind is None:
                raise InputError(f"Unsupported data file {str(p)!r}; valid extensions are {choices(sorted(_LOADERS))}.")
            if kind in ("json", "csv", "text"):
                _check_text_file(p)  # names the line of a bad byte or JSON line; datasets' errors do not
            with library_bars_off():  # "Generating train split": the data summary line says what matters
                ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except InputError:
        raise
    except Exception as e:  # datasets raises many types for malformed files
        raise InputError(f"Could not read data file {str(p)!r}: {type(e).__name__}: {e}") from None
    if len(ds) == 0:
        raise InputError(f"Dataset {str(p)!r} is empty (0 rows).")
    return ds, str(p)


def _check_text_file(p: Path) -> None:
    """Refuse an empty file, bytes that are not UTF-8, and (``.jsonl``) a line that is not JSON, naming the line.

    One extra read of the file (datasets reads it again): the cost of an error that says where.

    Raises:
        InputError: naming the file, the line and what is wrong there.
    """
    data = p.read_bytes()
    if not data.strip():
        raise InputError(f"Data file {str(p)!r} is empty (no rows).")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"Data file {str(p)!r}, line {line}: byte {data[e.start:e.start + 1]!r} at offset {e.start} is not UTF-8 "
            "text; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    if p.suffix.lower() != ".jsonl":
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"Data file {str(p)!r}, line {n} is not valid JSON ({e.msg}, column {e.colno}): "
                                 f"{line[:100]!r}.") from None


def detect_format(
    columns: list[str], fmt: str, text_field: str, instruction_field: str, messages_field: str, source: str
) -> str:
    """Resolve ``fmt='auto'`` from the column names; check the named fields exist.

    Raises:
        InputError: no recognizable field, or a requested field is absent.
    """
    if fmt == "auto":
        if messages_field in columns:
            return "chat"
        if instruction_field in columns:
            return "instruction"
        if text_field in columns:
            return "text"
        raise InputError(
            f"Cannot tell the format of {source!r}: its columns are {columns}, but none is "
            f"'{messages_field}' (chat), '{instruction_field}' (instruction) or '{text_field}' (text). "
            f"Set data.format and the data.*_field names."
        )
    need = {"chat": messages_field, "instruction": instruction_field, "text": text_field}[fmt]
    if need not in columns:
        raise InputError(f"Data {source!r} is declared as {fmt!r} but has no field '{need}' (columns: {columns}).")
    return fmt


def instruction_user_turn(instruction: str, extra: str) -> str:
    """The user message an instruction record becomes under a chat template (``extra`` = its input field)."""
    return instruction if not extra else f"{instruction}\n\n{extra}"


def instruction_prompt_text(instruction: str, extra: str) -> str:
    """The Alpaca-style prompt an instruction record becomes for a tokenizer without a chat template."""
    return _ALPACA_PROMPT.format(instruction=instruction, input_block=f"### Input:\n{extra}\n\n" if extra else "")


def _encode_text(tok, text: str) -> Example:
    ids = prompt_ids(tok, text, chat=False)
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return Example(ids, list(ids))


def template_roles(tok) -> frozenset[str]:
    """The roles a chat may use: the four every template family handles, plus any role its template names.

    A template that renders ``message['role']`` generically (ChatML) would print an unknown role such as
    ``wizard`` as a header of its own, which the model never saw; such rows are refused instead.
    """
    named = set(re.findall(r"""['"]([a-z_]+)['"]""", tok.chat_template or "")) & _ROLE_WORDS
    return frozenset({"system", "user", "assistant", "tool"} | named)


def _encode_chat(tok, messages: list[dict], train_on: str, where: str, eot: set[int],
                 roles: frozenset[str]) -> Example:
    """Render with the tokenizer's chat template; mark assistant turns by character span.

    The spans come from rendering growing prefixes of the conversation, so any
    template that renders a conversation as the concatenation of its turns
    works (Llama-3, Qwen2, Mistral, Gemma, Phi-3 templates all do). Each
    assistant turn's targets end with its end-of-turn token (``eot``, see
    :func:`qlora.generation.end_of_turn_ids`), the token generation stops at:
    whitespace the template writes after it belongs to the next turn and is not
    a target; a final assistant turn the template ends with no such token gets
    the eos token appended, so the model still learns to stop.
    """
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise InputError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {str(messages)[:120]!r}."
        )
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise InputError(f"{where}, turn {i} ({m['role']!r}): 'content' must be text, got {m['content']!r}.")
        if m["role"] not in roles:
            raise InputError(f"{where}, turn {i}: the role {m['role']!r} is not one the chat template knows; valid "
                             f"roles: {choices(sorted(roles))}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(
            f"{where}: the chat has no assistant turn, so there is nothing to learn from it "
            f"(roles: {[m['role'] for m in messages]})."
        )
    render = lambda msgs, gen=False: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, stop = len(render(messages[:i], gen=True)) if i else 0, len(render(messages[: i + 1]))
        if not full.startswith(render(messages[: i + 1])):
            raise InputError(
                f"{where}: the tokenizer's chat template does not render conversations prefix by prefix, "
                "so assistant turns cannot be located; set data.train_on=all."
            )
        spans.append((start, stop))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), [IGNORE] * len(enc["input_ids"])
    append_eos = False
    for a, b in spans:
        turn = [k for k, (s, _) in enumerate(enc["offset_mapping"]) if a <= s < b]
        ends = [k for k in turn if ids[k] in eot]
        if ends and not tok.decode(ids[ends[-1] + 1 : turn[-1] + 1]).strip():
            turn = [k for k in turn if k <= ends[-1]]
        elif not ends and b == len(full) and messages[-1]["role"] == "assistant":
            append_eos = tok.eos_token_id is not None
        for k in turn:
            labels[k] = ids[k]
    if append_eos:
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
    return Example(ids, list(ids) if train_on == "all" else labels)


def _encode_instruction(
    tok, record: dict, instruction_field: str, input_field: str, output_field: str, train_on: str, where: str,
    eot: set[int],
) -> Example:
    instr, out = record.get(instruction_field), record.get(output_field)
    for name, val in ((instruction_field, instr), (output_field, out)):
        if not isinstance(val, str) or not val.strip():
            raise InputError(
                f"{where}: field '{name}' is missing or empty "
                f"(instruction records need '{instruction_field}' and '{output_field}')."
            )
    extra = record.get(input_field) or ""
    if tok.chat_template:
        msgs = [{"role": "user", "content": instruction_user_turn(instr, extra)}, {"role": "assistant", "content": out}]
        return _encode_chat(tok, msgs, train_on, where, eot, frozenset({"user", "assistant"}))
    p_ids = prompt_ids(tok, instruction_prompt_text(instr, extra), chat=False)
    o_ids = tok(out, add_special_tokens=False)["input_ids"] + (
        [tok.eos_token_id] if tok.eos_token_id is not None else []
    )
    labels = (list(p_ids) if train_on == "all" else [IGNORE] * len(p_ids)) + o_ids
    return Example(p_ids + o_ids, labels)


def tokenize_dataset(
    ds,
    source: str,
    tokenizer,
    fmt: str,
    seq_len: int,
    train_on: str = "completion",
    text_field: str = "text",
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    messages_field: str = "messages",
) -> tuple[list[Example], DataStats]:
    """Tokenize every record; truncate to ``seq_len``; drop examples left without targets.

    Each returned :class:`Example` carries ``row``, the index of its record in ``ds``.

    Raises:
        InputError: a bad record (names the file, row and field), or every
            example longer than ``seq_len``.
    """
    fmt = detect_format(ds.column_names, fmt, text_field, instruction_field, messages_field, source)
    if fmt == "chat" and not tokenizer.chat_template:
        raise InputError(
            f"Data {source!r} holds chat records but the tokenizer has no chat template; "
            "use a tokenizer with one or convert the data to instruction records."
        )
    out, st = [], DataStats()
    eot = set(end_of_turn_ids(tokenizer))
    roles = template_roles(tokenizer) if fmt == "chat" else frozenset()
    for row, rec in enumerate(ds):
        where = f"{source}, row {row}"
        if fmt == "text":
            text = rec.get(text_field)
            if not isinstance(text, str):
                raise InputError(f"{where}: field '{text_field}' must be a string, got {type(text).__name__}.")
            if not text.strip():
                continue  # blank lines in .txt files carry nothing
            ex = _encode_text(tokenizer, text)
        elif fmt == "chat":
            ex = _encode_chat(tokenizer, rec.get(messages_field), train_on, f"{where}, field '{messages_field}'", eot,
                              roles)
        else:
            ex = _encode_instruction(
                tokenizer, rec, instruction_field, input_field, output_field, train_on, where, eot
            )
        ex.row = row
        st.examples += 1
        if len(ex.input_ids) > seq_len:
            st.truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], row)
        # labels are shifted by one inside the loss: position 0 never counts
        if sum(lab != IGNORE for lab in ex.labels[1:]) == 0:
            st.dropped += 1
            continue
        st.tokens += len(ex.input_ids)
        st.target_tokens += sum(lab != IGNORE for lab in ex.labels[1:])
        out.append(ex)
    if st.examples == 0:
        raise InputError(f"Dataset {source!r} has no usable records (all {len(ds)} rows are blank).")
    if not out:
        raise InputError(
            f"Every example in {source!r} ({st.examples}) loses all its target tokens when cut to seq_len={seq_len}; "
            f"raise seq_len or shorten the data."
        )
    log.info(
        "%s: %d examples, %d truncated to %d tokens, %d dropped (no targets left)",
        source, st.examples, st.truncated, seq_len, st.dropped,
    )
    return out, st


def pack_rows(examples: list[Example], seq_len: int, pad_id: int, packing: bool = True) -> dict[str, torch.Tensor]:
    """Lay examples into fixed rows of ``seq_len`` tokens.

    With packing, examples are placed greedily in order (first fit on the
    current row) and never split. Each example's positions restart at 0;
    trailing padding continues the last example's positions (see below).

    Returns:
        dict of int64 tensors ``input_ids``, ``labels``, ``position_ids``, each (rows, seq_len).
    """
    rows: list[list[Example]] = []
    for ex in examples:
        used = sum(len(e.input_ids) for e in rows[-1]) if rows else seq_len
        if packing and used + len(ex.input_ids) <= seq_len:
            rows[-1].append(ex)
        else:
            rows.append([ex])
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            k = len(ex.input_ids)
            ids[r, at : at + k] = torch.tensor(ex.input_ids)
            lab = torch.tensor(ex.labels)
            lab[0] = IGNORE  # the first token of a segment has no prediction inside it
            labels[r, at : at + k] = lab
            pos[r, at : at + k] = torch.arange(k)
            at += k
        # Padding continues the last example's positions instead of restarting:
        # it carries no loss and sits after every real token, so letting it see
        # the last example changes nothing, and a row holding one example keeps
        # monotone positions -- transformers then uses plain causal attention
        # instead of building a (seq x seq) block mask.
        last = len(row[-1].input_ids)
        pos[r, at:] = torch.arange(last, last + seq_len - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically hold out ``fraction`` of examples (at least one when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(round(len(examples) * fraction)))
    held = set(idx[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def epoch_order(n_rows: int, epoch: int, seed: int) -> list[int]:
    """The row order of one epoch: a permutation fixed by (seed, epoch), so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()
