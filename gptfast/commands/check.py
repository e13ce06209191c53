"""``gptfast check``: every fused op against its reference on this device; non-zero exit on failure.

The first thing to run on a new GPU. Without CUDA the Triton kernels run through the
CPU interpreter on small shapes (slow, but the same kernel code).
"""
import os
import sys

from gptfast.commands import sigterm_as_interrupt

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def register(subparsers):
    p = subparsers.add_parser(
        "check", help="check every fused op against its reference (forward and backward)",
        description="Run layer_norm (with/without residual), causal_attention (with/without q_offset), "
                    "decode_attention and the sampler against their reference twins on this device, "
                    "in fp32/fp16 (+bf16 on CUDA), and print a pass/fail table of error ratios.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller grid of shapes")
    p.add_argument("--ops", help="comma-separated subset of: sampler and the ops of gptfast.ops.registry "
                                 "(layer_norm,causal_attention,decode_attention)")
    p.add_argument("--dtypes", help="comma-separated subset of: float32,float16,bfloat16")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--max-ratio", type=float, default=None,
                   help="allowed fused/plain error ratio (default 3.0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each result as it comes")
    p.set_defaults(func=run)


def _prepare_interpreter(device_type: str) -> None:
    """The Triton interpreter must be chosen before triton is first imported."""
    if device_type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        print("gptfast check: triton was imported before TRITON_INTERPRET could be set; "
              "the fused ops will take their torch path on this CPU", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "1"


def run(args) -> int:
    import torch

    from gptfast.runtime.atomic_files import check_output_file

    if args.json:
        check_output_file(args.json, "--json")

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    _prepare_interpreter(device.type)

    import json
    from dataclasses import asdict

    from gptfast import checker

    if args.max_ratio is not None and args.max_ratio <= 0:
        raise ValueError(f"--max-ratio must be positive, got {args.max_ratio}")
    max_ratio = args.max_ratio if args.max_ratio is not None else checker.DEFAULT_MAX_RATIO
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    dtypes = None
    if args.dtypes:
        names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in names if d not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from float32, float16, bfloat16")
        dtypes = [getattr(torch, DTYPES[d]) for d in names]
    cases = checker.build_cases(device, quick=args.quick, ops=ops, dtypes=dtypes, max_ratio=args.max_ratio)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"gptfast check: {len(cases)} cases on {where}", file=sys.stderr)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None

    def save(results):  # after every case: a run killed outright still leaves its results
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"device": where, "max_ratio": max_ratio, "results": [asdict(r) for r in results]}, f, indent=1)
        os.replace(tmp, args.json)

    with sigterm_as_interrupt():  # `timeout`: print what was checked
        results = checker.run_checks(cases, log=log, progress=save if args.json else None)
    print(checker.format_table(results, max_ratio))
    if args.json:
        save(results)
    failed = [r for r in results if not r.passed]
    stop = checker.stopped_by_cuda_error(results)
    if stop is not None:
        print(f"\ngptfast check: {stop.detail}", file=sys.stderr)
    if failed:
        print(f"\ngptfast check: {len(failed)} FAILED", file=sys.stderr)
        return 1
    print("\ngptfast check: all passed", file=sys.stderr)
    return 0
