"""``gptfast generate``: continue a prompt with a local checkpoint."""
import time


def register(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a local checkpoint")
    p.add_argument("--model", help="local HF GPT-2 directory (config.json + weights); default: a random tiny model")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory with it (default: the model dir's, else bytes)")
    p.add_argument("--prompt", default="def main(", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default=None, choices=["reference", "torch", "fused"])
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    from gptfast.tokenizer import has_tokenizer_files, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model:
        model = GPT.from_pretrained(args.model, backend=args.backend, device=device, dtype=dtype)
        tok_path = args.tokenizer or (args.model if has_tokenizer_files(args.model) else None)
    else:
        print("no --model given: using a randomly initialised tiny model (expect noise)")
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("tiny"), backend=args.backend).to(device=device, dtype=dtype).eval()
        tok_path = args.tokenizer
    tokenizer = load_tokenizer(tok_path)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    start = time.perf_counter()
    out = model.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist()))
    print(f"\n[{args.max_new_tokens} tokens in {elapsed:.2f} s: {args.max_new_tokens / elapsed:.1f} tokens/s]")
    return 0
