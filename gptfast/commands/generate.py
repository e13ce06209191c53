"""``gptfast generate``: continue a prompt with a local checkpoint, streaming the text."""
import sys
import time


def register(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a local checkpoint")
    p.add_argument("--model", help="local HF GPT-2 directory (config.json + weights); default: a random tiny model")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory with it (default: the model dir's, else bytes)")
    p.add_argument("--prompt", default="def main(", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="default: a random seed (printed at the end)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--engine", default="auto", choices=["auto", "cpp", "python"],
                   help="sampling loop: the C++ extension, its Python twin, or whichever loads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default=None, choices=["reference", "torch", "fused"])
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast.config import GPTConfig
    from gptfast.generation import generate, get_engine
    from gptfast.model import GPT
    from gptfast.sampling import SamplingParams
    from gptfast.tokenizer import has_tokenizer_files, load_tokenizer

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model:
        model = GPT.from_pretrained(args.model, backend=args.backend, device=device, dtype=dtype)
        tok_path = args.tokenizer or (args.model if has_tokenizer_files(args.model) else None)
    else:
        print("no --model given: using a randomly initialised tiny model and the byte tokenizer (expect noise)")
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("tiny"), backend=args.backend).to(device=device, dtype=dtype)
        tok_path = args.tokenizer
    model.eval()
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} tokens do not fit the model's vocabulary "
                         f"of {model.config.vocab_size}")
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    engine = get_engine(args.engine)  # load (or build) the extension before the clock starts

    print(args.prompt, end="", flush=True)

    def show(row, token_ids, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    result = generate(model, [prompt_ids], params, tokenizer=tokenizer, stream=show, engine=engine.name)[0]
    elapsed = time.perf_counter() - start
    n = len(result.token_ids)
    print(f"\n[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s; engine {engine.name}, "
          f"finish {result.finish_reason}, seed {result.seed}]")
    return 0
