"""Generation: prompts -> token ids -> greedy or sampled replies, batched, stopping at the end of the turn.

Prompts are rendered exactly as :mod:`qlora.data` renders training data (the
chat template with ``add_generation_prompt``, tokenized without extra special
tokens; raw text gets the tokenizer's BOS), so a model is asked in the form it
was trained on. A batch is left-padded with an attention mask: transformers'
``generate`` then derives each row's position ids from the mask (the first
real token of every row is position 0), so a padded row computes what it
would alone, up to floating-point rounding.

``adapters=`` names each prompt's adapter (or None, the base): a batch then mixes
adapters, each row running its own over the one shared base (:mod:`qlora.adapters.routing`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from qlora.adapters.multi import active_adapter, disable_adapters, set_active_adapter
from qlora.adapters.routing import AdapterRouter, route_adapters
from qlora.lora.surgery import lora_modules
from quant.errors import InputError

log = logging.getLogger(__name__)

# Stands in for an assistant reply when probing a chat template: text no template rewrites
_PROBE = "qlora-probe-reply-7f3a"


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return ids


def _turn_suffix(tokenizer) -> str | None:
    """The text a chat template renders right after an assistant message's content; None if it cannot tell."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # templates raise their own errors (jinja, role checks); then only eos ends a turn
        log.info("could not render the chat template to find its end-of-turn token: %s", e)
        return None
    at = text.rfind(_PROBE)
    return None if at < 0 else text[at + len(_PROBE):]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that end an assistant turn: the eos token, then the template's end-of-turn token.

    The end-of-turn token is the first special token the chat template renders
    after an assistant message's content (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``...), skipping only whitespace; plain text there (or no
    template) adds nothing. Generation stops at any of these ids, and
    :mod:`qlora.data` makes every trained assistant turn end with one of them.

    Returns:
        distinct ids, eos first; empty when the tokenizer has neither.
    """
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    suffix = _turn_suffix(tokenizer) if tokenizer.chat_template else None
    if suffix:
        special = _special_ids(tokenizer)
        for t in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
            if t in special:
                if t not in ids:
                    ids.append(int(t))
                break
            if tokenizer.decode([t]).strip():
                break  # text before any special token: the template ends turns with plain text
    return ids


def prompt_ids(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of one prompt, ready to be continued by the model.

    Args:
        prompt: a user message, or the conversation so far as ``{role, content}`` dicts.
        chat: render with the tokenizer's chat template and the assistant header
            (``add_generation_prompt``); ignored (raw text) when the tokenizer has
            none. ``False``: ``prompt`` is raw text, tokenized with the BOS token.

    Raises:
        InputError: a conversation (list) where no chat template applies.
    """
    if chat and tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # the template writes its own special tokens (BOS included): as qlora.data tokenizes chats
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise InputError(
            "A conversation (list of turns) needs a tokenizer with a chat template"
            + ("" if tokenizer.chat_template else ", and this one has none")
            + "; give the prompt as plain text instead."
        )
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids  # some tokenizers define a BOS but do not add it themselves
    return ids


def _model_eos(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    streamer=None,
    adapters: Sequence[str | None] | None = None,
) -> list[str]:
    """Continue each prompt until an end-of-turn token or ``max_new_tokens``.

    Prompts are grouped by length into left-padded batches of ``batch_size``
    (int64 ``input_ids`` and ``attention_mask``, (batch, longest prompt)) and
    run through transformers' ``model.generate`` with the KV cache on (training
    turns ``model.config.use_cache`` off, so it is asked for explicitly), in
    eval mode under ``no_grad``; the model's train/eval mode is restored after.
    Greedy replies (``temperature=0``) of a batch equal those of each prompt
    alone, up to floating-point rounding on near-tied logits.

    Args:
        prompts: token ids from :func:`prompt_ids`, one list per prompt.
        temperature: 0 = greedy; > 0 samples (with ``top_p``) from ``torch``'s global RNG.
        streamer: a transformers streamer (e.g. ``TextStreamer``) fed the tokens as
            they are produced; only with a single prompt.
        adapters: None runs the model as it is (its active adapter). Else one loaded adapter's name
            per prompt, or None for the base alone: batches then mix adapters, each row running its
            own (:func:`qlora.adapters.routing.route_adapters`); when every prompt names the same one,
            that adapter is simply made active for the call (the previous one is active again after).

    Returns:
        One reply per prompt, in order: the new tokens up to (not including) the
        first stop token, decoded without special tokens.

    Raises:
        InputError: a non-positive ``max_new_tokens``/``batch_size``, ``temperature < 0``,
            ``top_p`` outside (0, 1], an empty prompt, a streamer with several prompts,
            an ``adapters`` list of another length than ``prompts``, or an adapter name not loaded.
    """
    replies: list[str] = [""] * len(prompts)
    for i, reply in generate_batches(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size,
                                     streamer, adapters):
        replies[i] = reply
    return replies


def generate_batches(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    streamer=None,
    adapters: Sequence[str | None] | None = None,
) -> Iterator[tuple[int, str]]:
    """:func:`generate`, yielding ``(index into prompts, reply)`` for each prompt as its batch finishes.

    Batches run longest prompts first, so replies come out of input order. The
    model is set up (eval mode, adapters routed) on the first ``next()`` and
    restored when the iterator is exhausted or closed. Arguments and ``Raises:``
    as :func:`generate`; the checks run before the first batch.
    """
    _check(prompts, max_new_tokens, temperature, top_p, batch_size, streamer, adapters)
    stop = end_of_turn_ids(tokenizer)
    stop += [e for e in _model_eos(model) if e not in stop]  # e.g. Llama-3 lists several eos ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    sample = temperature > 0
    device = next(model.parameters()).device
    # longest first, so each batch pads to prompts of similar length
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with _serving(model, adapters) as router:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if router is not None:
                    router.set_rows([adapters[i] for i in idx])
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, width - len(prompts[i]):] = 1
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                        do_sample=sample, temperature=temperature if sample else None,
                        top_p=top_p if sample else None, eos_token_id=stop or None, pad_token_id=pad,
                        use_cache=True, streamer=streamer,
                    )
                for r, i in enumerate(idx):
                    new = out[r, width:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in stop), len(new))
                    yield i, tokenizer.decode(new[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)


def _check(prompts, max_new_tokens, temperature, top_p, batch_size, streamer, adapters) -> None:
    if max_new_tokens <= 0 or batch_size <= 0:
        raise InputError(f"max_new_tokens and batch_size must be > 0, got {max_new_tokens} and {batch_size}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}.")
    if any(len(p) == 0 for p in prompts):
        raise InputError("Every prompt needs at least one token; got an empty one.")
    if streamer is not None and len(prompts) != 1:
        raise InputError(f"A streamer shows one reply at a time; got {len(prompts)} prompts.")
    if adapters is not None and len(adapters) != len(prompts):
        raise InputError(f"adapters names one adapter (or None) per prompt: got {len(adapters)} names for "
                         f"{len(prompts)} prompts.")


@contextlib.contextmanager
def _serving(model, adapters: Sequence[str | None] | None) -> Iterator[AdapterRouter | None]:
    """Set the model up for ``adapters`` (see :func:`generate`); yields the router when rows need one."""
    used = [] if adapters is None else list(dict.fromkeys(adapters))
    if adapters is None:
        yield None
    elif used == [None]:  # the base alone: no adapter work at all
        with disable_adapters(model):
            yield None
    elif len(used) == 1:  # one adapter for every prompt: run it as the model's own, exactly as alone
        before = active_adapter(model)
        set_active_adapter(model, used[0])
        try:
            with _enabled(model):
                yield None
        finally:
            if before is not None and before != used[0]:
                set_active_adapter(model, before)
    else:
        with route_adapters(model, [n for n in used if n is not None]) as router:
            yield router


@contextlib.contextmanager
def _enabled(model) -> Iterator[None]:
    """Adapters on inside the block whatever they were (``adapters=`` names what runs), as on entry after."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.set_enabled(True) for m in mods]
    try:
        yield
    finally:
        for m, was in zip(mods, before):
            m.set_enabled(was)
