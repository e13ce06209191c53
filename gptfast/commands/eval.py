"""``gptfast eval``: validation loss and perplexity of a model on a data set."""
import json


def register(subparsers):
    p = subparsers.add_parser(
        "eval",
        help="validation loss / perplexity of a checkpoint on a data set",
        description="Score a model directory (a gptfast run directory or a Hugging Face GPT-2 directory) on data. "
        "Data settings default to the run's own (train_config.json), else the embedded standard-library corpus.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="run directory (checkpoint.pt) or HF GPT-2 directory")
    p.add_argument("--data", help="text file, folder or JSONL (default: the run's data, else the standard library)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"], help="which part of the data to score")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory with it (default: the model's)")
    p.add_argument("--finetune", action="store_true", default=None, help="score a prompt/completion JSONL on completions")
    p.add_argument("--val-fraction", type=float, help="validation fraction of the data (default: the run's, else 0.05)")
    p.add_argument("--corpus-max-bytes", type=int, help="cap of the embedded corpus (default: the run's)")
    p.add_argument("--cache-dir", help="token cache directory")
    p.add_argument("--block-size", type=int, help="context of each scored window (default: the run's, else the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="score at most this many batches (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--backend", choices=["reference", "torch", "fused"], help="op backend (default: per device)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _run_settings(model_dir) -> dict:
    """The training run's settings, when the directory is a gptfast run directory."""
    import os

    path = os.path.join(model_dir, "train_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run(args) -> int:
    from gptfast.checkpoint import load_model_dir
    from gptfast.data import load_dataset
    from gptfast.distributed import resolve_device
    from gptfast.tokenizer import load_tokenizer
    from gptfast.train_config import TrainConfig
    from gptfast.training import autocast_dtype, evaluate

    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise ValueError("--batch-size and --max-batches must be >= 1")
    run_cfg = _run_settings(args.model)
    model, tokenizer_path = load_model_dir(args.model, backend=args.backend)
    device = resolve_device(args.device)
    model = model.to(device)
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.config.vocab_size}")

    same_data = args.data is None
    data = args.data if args.data is not None else run_cfg.get("data")
    val_fraction = args.val_fraction or (run_cfg.get("val_fraction") if same_data else None) or 0.05
    corpus_cap = args.corpus_max_bytes if args.corpus_max_bytes is not None else run_cfg.get("corpus_max_bytes", 2_000_000)
    finetune = args.finetune if args.finetune is not None else (run_cfg.get("finetune") if same_data else None)
    dataset = load_dataset(
        data, tokenizer, val_fraction=val_fraction, cache_dir=args.cache_dir or run_cfg.get("cache_dir"),
        corpus_max_bytes=corpus_cap or None, finetune=finetune, progress=not args.json,
    )
    block_size = args.block_size or (run_cfg.get("block_size") if same_data else None) or model.config.block_size
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is longer than the model's context of {model.config.block_size} tokens")
    split = dataset.split(args.split)
    amp = autocast_dtype(TrainConfig(dtype=args.dtype), device)
    result = evaluate(model, split, batch_size=args.batch_size, block_size=block_size, max_batches=args.max_batches, dtype=amp)
    if args.json:
        print(json.dumps({"split": args.split, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}))
    else:
        print(f"{dataset.description} [{args.split}]: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
              f"over {result.tokens:,} tokens")
    return 0
