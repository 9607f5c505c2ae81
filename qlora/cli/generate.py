"""``qlora generate --base MODEL [--adapter DIR] --prompt TEXT``: answer prompts with the NF4 base + adapter.

Replies stop at the end of the assistant turn
(:func:`qlora.generation.end_of_turn_ids`) and are streamed to stdout as
they are produced unless ``--no-stream``.
"""

from __future__ import annotations


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Generate text from the 4-bit base model, optionally with a trained adapter, using the "
        "tokenizer's chat template when it has one. Each reply stops at the end of the assistant's turn.",
    )
    p.add_argument("--base", required=True,
                   help="base model: a folder (16-bit or bnb-4bit), a .gguf file, or builtin:tiny-llama")
    p.add_argument("--adapter", help="PEFT-format adapter folder (e.g. a training output_dir)")
    p.add_argument("--prompt", required=True, action="append", help="user message; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--no-stream", action="store_true",
                   help="print each reply when it is complete (all prompts in one batch) instead of token by token")
    p.add_argument("--quant-type", default=None, choices=["nf4", "fp4", "none"],
                   help="how the base is loaded: 4-bit NF4, FP4, or none (16-bit); default: the base the adapter "
                   "records it was trained on, else nf4")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from qlora.adapters.files import load_adapter, read_adapter
    from qlora.adapters.record import serving_format
    from qlora.builtin_models import resolve_model_dir
    from qlora.generation import generate, prompt_ids
    from qlora.train.setup import resolve_device
    from quant import InputError
    from quant.loading import load_quantized_model

    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}.")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature} and {args.top_p}.")
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.base)
    tok = AutoTokenizer.from_pretrained(model_dir)
    record = read_adapter(args.adapter).base if args.adapter else None
    model = load_quantized_model(model_dir, device, **serving_format(record, args.quant_type))
    if args.adapter:
        load_adapter(model, args.adapter)
    torch.manual_seed(args.seed)
    ids = [prompt_ids(tok, p, chat=not args.no_chat_template) for p in args.prompt]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.no_stream:
        for prompt, reply in zip(args.prompt, generate(model, tok, ids, **kw)):
            print(f"> {prompt}\n{reply.strip()}\n", flush=True)
        return 0
    for prompt, one in zip(args.prompt, ids):
        print(f"> {prompt}", flush=True)
        # the streamer prints decoded text as tokens arrive and ends the reply with a newline
        generate(model, tok, [one], streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **kw)
        print(flush=True)
    return 0
