"""``qlora generate --base MODEL_DIR [--adapter DIR] --prompt TEXT``: sample from the NF4 base + adapter."""

from __future__ import annotations


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Generate text from the 4-bit base model, optionally with a trained adapter, using the "
        "tokenizer's chat template when it has one.",
    )
    p.add_argument("--base", required=True, help="base model folder (16-bit or bnb-4bit) or builtin:tiny-llama")
    p.add_argument("--adapter", help="PEFT-format adapter folder (e.g. a training output_dir)")
    p.add_argument("--prompt", required=True, action="append", help="user message; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from qlora.adapters.files import load_adapter
    from qlora.builtin_models import resolve_model_dir
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
    model = load_quantized_model(model_dir, device)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    torch.manual_seed(args.seed)
    for prompt in args.prompt:
        if tok.chat_template and not args.no_chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        sample = args.temperature > 0
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=sample,
                temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        print(f"> {prompt}\n{tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}\n", flush=True)
    return 0
