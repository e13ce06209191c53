"""``gptfast quantize``: write a weight-only int8 copy of a local checkpoint."""
import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def register(subparsers):
    p = subparsers.add_parser("quantize", help="write a weight-only int8 copy of a local checkpoint")
    p.add_argument("--model", required=True, help="local HF GPT-2 directory (config.json + weights)")
    p.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--scale-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the per-channel scales (default: bfloat16 for a bfloat16 model, else float32)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast.model import GPT
    from gptfast.quantization import is_quantized_checkpoint, quantize, save_quantized
    from gptfast.runtime.atomic_files import check_output_dir

    if os.path.abspath(args.model) == os.path.abspath(args.out):
        raise ValueError(f"--out {args.out!r} is the --model directory: write the quantized copy elsewhere")
    check_output_dir(args.out, "--out")  # before the model loads: a wrong --out fails at once
    if is_quantized_checkpoint(args.model):
        raise ValueError(f"--model {args.model!r} is already quantized (int8)")
    model = GPT.from_pretrained(args.model, device="cpu")
    quantize(model, "int8", scale_dtype=getattr(torch, args.scale_dtype) if args.scale_dtype else None)
    save_quantized(model, args.out)
    copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(args.model, f))]
    for name in copied:
        shutil.copyfile(os.path.join(args.model, name), os.path.join(args.out, name))
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"wrote {args.out}: int8 weights, {size / 2**20:.1f} MiB" + (f" (+ {', '.join(copied)})" if copied else ""))
    return 0
