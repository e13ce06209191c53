"""``gptfast generate``: continue a prompt with a local checkpoint, streaming the text."""
import sys
import time

from gptfast.commands import device_arg


def register(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a local checkpoint")
    p.add_argument("--model", help="local model directory: a HF GPT-2 directory (config.json + weights) or a "
                                   "gptfast run directory; default: a random tiny model")
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
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda or cuda:N (auto: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default=None, choices=["reference", "torch", "fused"])
    p.add_argument("--draft", metavar="DIR", default=None,
                   help="speculative decoding: a smaller draft model directory (same tokenizer as --model)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="speculative decoding: draft tokens per round, 1..16 (with --draft; default 4)")
    p.add_argument("--int8", action="store_true",
                   help="quantize the linear layers to weight-only int8 after loading (see gptfast quantize)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast.generation.engines import get_engine
    from gptfast.generation.generate import generate
    from gptfast.checkpoints.loader import load_model_and_tokenizer
    from gptfast.quantization import is_quantized, quantize
    from gptfast.generation.sampling_params import SamplingParams
    from gptfast.generation.speculative import DEFAULT_DRAFT_TOKENS

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
    if args.model is None:
        print("no --model given: using a randomly initialised tiny model and the byte tokenizer (expect noise)")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded = load_model_and_tokenizer(args.model, preset="tiny", tokenizer=args.tokenizer, backend=args.backend,
                                      device=args.device, dtype=dtype)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if args.int8 and not is_quantized(model):
        quantize(model, "int8")
    speculative = {}
    if args.draft is not None:
        draft = load_model_and_tokenizer(args.draft, tokenizer=args.tokenizer, backend=args.backend,
                                         device=args.device, dtype=dtype)
        k = DEFAULT_DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
        speculative = dict(draft_model=draft.model.eval(), num_draft_tokens=k, draft_tokenizer=draft.tokenizer)
    elif args.draft_tokens is not None:
        raise ValueError("--draft-tokens needs --draft DIR")
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    engine = get_engine(args.engine)  # load (or build) the extension before the clock starts

    print(args.prompt, end="", flush=True)

    def show(row, token_ids, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    result = generate(model, [prompt_ids], params, tokenizer=tokenizer, stream=show, engine=engine.name,
                      **speculative)[0]
    elapsed = time.perf_counter() - start
    n = len(result.token_ids)
    accepted = (f"; draft tokens accepted {result.accepted_draft_tokens}/{result.draft_tokens}"
                if result.draft_tokens is not None else "")
    print(f"\n[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s; engine {engine.name}, "
          f"finish {result.finish_reason}, seed {result.seed}{accepted}]")
    return 0
