"""``gptfast eval``: validation loss and perplexity of a model on a data set."""
import json

from gptfast.commands import device_arg
from gptfast.training.precision import AUTOCAST_SETTINGS


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
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=AUTOCAST_SETTINGS)
    p.add_argument("--backend", choices=["reference", "torch", "fused"], help="op backend (default: per device)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _run_settings(model_dir) -> dict:
    """The training run's settings, when the directory is a gptfast run directory."""
    import os

    path = os.path.join(model_dir, "train_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file of training settings ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of training settings, got {type(settings).__name__}")
    return settings


def _check_flags(args) -> None:
    """Every numeric flag, by the rules of the training setting of the same name."""
    from gptfast.training.config import RANGES, Range, check_setting

    for name in ("val_fraction", "corpus_max_bytes", "block_size", "batch_size"):
        check_setting(name, getattr(args, name), RANGES[name])
    check_setting("max_batches", args.max_batches, Range(1))


def run(args) -> int:
    from gptfast.training.data import load_dataset
    from gptfast.training.evaluation import evaluate
    from gptfast.checkpoints.loader import load_model_and_tokenizer
    from gptfast.training.precision import autocast_dtype

    _check_flags(args)
    run_cfg = _run_settings(args.model)
    loaded = load_model_and_tokenizer(args.model, tokenizer=args.tokenizer, backend=args.backend, device=args.device)
    model = loaded.model

    same_data = args.data is None  # the run's own data: its split and context apply too

    def setting(name, default):
        """The flag when given, else the run's setting (for the run's own data), else ``default``."""
        value = getattr(args, name)
        if value is None and same_data:
            value = run_cfg.get(name)
        return default if value is None else value

    corpus_cap = args.corpus_max_bytes if args.corpus_max_bytes is not None else run_cfg.get("corpus_max_bytes", 2_000_000)
    dataset = load_dataset(
        args.data if args.data is not None else run_cfg.get("data"), loaded.tokenizer,
        val_fraction=setting("val_fraction", 0.05), cache_dir=args.cache_dir or run_cfg.get("cache_dir"),
        corpus_max_bytes=corpus_cap or None, finetune=setting("finetune", None), progress=not args.json,
    )
    block_size = setting("block_size", model.config.block_size)
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is longer than the model's context of {model.config.block_size} tokens "
                         "(--block-size)")
    amp = autocast_dtype(args.dtype, args.device)
    result = evaluate(model, dataset.split(args.split), batch_size=args.batch_size, block_size=block_size,
                      max_batches=args.max_batches, dtype=amp)
    if args.json:
        print(json.dumps({"split": args.split, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}))
    else:
        print(f"{dataset.description} [{args.split}]: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
              f"over {result.tokens:,} tokens")
    return 0
