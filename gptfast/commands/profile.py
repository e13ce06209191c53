"""``gptfast profile [generate|train|op NAME]``: torch.profiler trace, key-averages table and summary."""

TARGETS = ("generate", "train", "op")
DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers):
    p = subparsers.add_parser(
        "profile", help="profile generation, training or one op with torch.profiler",
        description="Writes OUT/trace.json (open in https://ui.perfetto.dev), OUT/key_averages.txt and "
                    "OUT/summary.json (time per phase, kernel time vs host gaps, host syncs per generated token).",
    )
    p.add_argument("target", nargs="?", default="generate", choices=TARGETS)
    p.add_argument("op_name", nargs="?", help="with `op`: an op of gptfast.ops.registry "
                                              "(layer_norm, causal_attention, decode_attention)")
    p.add_argument("--out", default="runs/profile", help="output directory (default: runs/profile)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", help="generate: a local HF GPT-2 directory (default: random weights of --preset)")
    p.add_argument("--preset", help="model preset (default: gpt2 on CUDA, tiny on CPU)")
    p.add_argument("--backend", choices=["reference", "torch", "fused"], help="generate: op backend")
    p.add_argument("--batch", type=int, default=None, help="batch size (generate: 1, train: 8)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=None, help="train: tokens per sequence (default: the model's context)")
    p.add_argument("--warmup", type=int, default=None, help="steps traced and discarded before recording")
    p.add_argument("--active", type=int, default=None, help="steps recorded")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast import profiling
    from gptfast.runtime.atomic_files import check_output_dir

    check_output_dir(args.out, "--out")

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.target != "op" and args.op_name:
        raise ValueError(f"unexpected argument {args.op_name!r}: only `gptfast profile op NAME` takes a name")
    for name in ("batch", "prompt_len", "new_tokens", "seq_len", "active"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    schedule = {k: v for k, v in (("warmup", args.warmup), ("active", args.active)) if v is not None}

    if args.target == "generate":
        model = profiling.build_model(device, model_dir=args.model, preset=args.preset, dtype=dtype, backend=args.backend)
        summary = profiling.profile_generate(args.out, device=device, model=model, batch=args.batch or 1,
                                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, **schedule)
    elif args.target == "train":
        summary = profiling.profile_train(args.out, device=device, preset=args.preset, batch=args.batch or 8,
                                          seq_len=args.seq_len, **schedule)
    else:
        if not args.op_name:
            from gptfast.ops import registry

            raise ValueError(f"`gptfast profile op` needs an op name: one of {', '.join(registry.NAMES)}")
        if device.type == "cpu":
            print("note: on the CPU the op takes its torch path (a profile of the Triton interpreter means nothing)")
        summary = profiling.profile_op(args.op_name, args.out, device=device, dtype=dtype, **schedule)

    with open(summary.table) as f:
        print(f.read())
    print(summary.text())
    return 0
