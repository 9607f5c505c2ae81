"""The task metric: answer each held-out prompt greedily and compare the reply with the reference.

Loss says how likely the references are; the task metric says whether the
model, left to itself, produces them. A reference that is a JSON object or
array (structured output, as in ``people-json``) is compared after parsing, so
spacing and key order do not matter but the reply must be valid JSON;
anything else is compared as a string with surrounding whitespace stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qlora.data import instruction_prompt_text, instruction_user_turn
from qlora.generation import generate, prompt_ids
from quant.errors import InputError, choices

TASK_FORMATS = ("chat", "instruction")


@dataclass(frozen=True)
class TaskExample:
    """One prompt to answer and the reply it should get.

    ``prompt`` is the conversation before the last assistant turn (an
    instruction record's single user turn, built as :mod:`qlora.data` builds
    it). ``text_prompt`` is the Alpaca-style prompt an instruction record is
    trained with when the tokenizer has no chat template (None for chat records).
    """

    prompt: list[dict]
    reference: str
    text_prompt: str | None = None


@dataclass(frozen=True)
class TaskScore:
    """Greedy replies scored against references.

    ``exact_match`` is the fraction of the ``n`` replies equal to their
    reference (see :func:`score`); ``valid_json`` the fraction of the
    ``json_n`` replies whose reference is JSON that parse as JSON (None when no
    reference is JSON). ``samples`` holds ``(prompt user text, reply,
    reference)`` for every example, in order.
    """

    n: int
    exact_match: float
    valid_json: float | None
    samples: list[tuple[str, str, str]]
    json_n: int = 0

    def summary(self) -> str:
        """One line: ``task: exact match 12/48 (25.0%), valid JSON 40/48 (83.3%)``."""
        hit = round(self.exact_match * self.n)
        line = f"task: exact match {hit}/{self.n} ({100 * self.exact_match:.1f}%)"
        if self.valid_json is not None:
            ok = round(self.valid_json * self.json_n)
            line += f", valid JSON {ok}/{self.json_n} ({100 * self.valid_json:.1f}%)"
        return line


def _parse_json(text: str):
    """The parsed JSON object or array in ``text``; None when it is neither."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def score(reply: str, reference: str) -> tuple[bool, bool | None]:
    """Whether ``reply`` matches ``reference``.

    Returns:
        ``(exact, valid_json)``. When ``reference`` parses as a JSON object or
        array, ``reply`` must parse as JSON too and be equal after parsing
        (``valid_json`` says whether it parsed); otherwise ``exact`` is string
        equality after stripping whitespace and ``valid_json`` is None.
    """
    ref = _parse_json(reference)
    if ref is None:
        return reply.strip() == reference.strip(), None
    try:
        got = json.loads(reply)
    except ValueError:
        return False, False
    return got == ref, True


def _chat_example(messages, where: str) -> TaskExample:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise InputError(f"{where}: 'messages' must be a list of {{role, content}} objects, "
                         f"got {str(messages)[:120]!r}.")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise InputError(f"{where}: the chat needs an assistant turn after a prompt to be answered "
                         f"(roles: {[m['role'] for m in messages]}).")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return TaskExample(prompt, messages[last]["content"])


def task_examples(
    records,
    fmt: str,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    messages_field: str = "messages",
) -> list[TaskExample]:
    """The prompts a task asks and the replies it expects, one per record.

    Args:
        records: an iterable of dicts (a ``datasets.Dataset`` from :func:`qlora.data.load_records`).
        fmt: ``chat`` (the reference is the last assistant turn, the prompt every turn
            before it) or ``instruction`` (the output field; the prompt is the
            instruction and input fields, as qlora.data renders them).

    Raises:
        InputError: ``text`` or another format (no prompts to answer), or a record
            without the fields its format needs (names the row).
    """
    if fmt not in TASK_FORMATS:
        raise InputError(
            f"The task metric needs prompts with reference replies, so data format {fmt!r} has none to score; "
            f"valid formats are {choices(TASK_FORMATS)}."
        )
    out = []
    for row, rec in enumerate(records):
        where = f"row {row}"
        if fmt == "chat":
            out.append(_chat_example(rec.get(messages_field), f"{where}, field '{messages_field}'"))
            continue
        instr, ref = rec.get(instruction_field), rec.get(output_field)
        if not isinstance(instr, str) or not isinstance(ref, str):
            raise InputError(f"{where}: instruction records need string fields '{instruction_field}' "
                             f"and '{output_field}'.")
        extra = rec.get(input_field) or ""
        user = {"role": "user", "content": instruction_user_turn(instr, extra)}
        out.append(TaskExample([user], ref, instruction_prompt_text(instr, extra)))
    return out


def _user_text(ex: TaskExample) -> str:
    users = [m["content"] for m in ex.prompt if m["role"] == "user"]
    return users[-1] if users else ex.prompt[-1]["content"]


def evaluate_task(model, tokenizer, examples: list[TaskExample], max_new_tokens: int = 64,
                  batch_size: int = 16) -> TaskScore:
    """Greedy replies to every example's prompt (:func:`qlora.generation.generate`), scored by :func:`score`.

    Prompts use the chat template when the tokenizer has one; otherwise an
    instruction example's ``text_prompt``, as the model was trained.

    Raises:
        InputError: no examples, a chat example for a tokenizer without a chat
            template, or bad generation arguments.
    """
    if not examples:
        raise InputError("No task examples to evaluate.")
    if tokenizer.chat_template:
        ids = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    elif all(ex.text_prompt is not None for ex in examples):
        ids = [prompt_ids(tokenizer, ex.text_prompt, chat=False) for ex in examples]
    else:
        raise InputError("Chat examples need a tokenizer with a chat template, and this one has none.")
    replies = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scored = [score(r, ex.reference) for r, ex in zip(replies, examples)]
    judged = [v for _, v in scored if v is not None]
    return TaskScore(
        n=len(examples),
        exact_match=sum(e for e, _ in scored) / len(examples),
        valid_json=sum(judged) / len(judged) if judged else None,
        samples=[(_user_text(ex), r, ex.reference) for ex, r in zip(examples, replies)],
        json_n=len(judged),
    )
