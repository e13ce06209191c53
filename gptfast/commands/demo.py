"""``gptfast demo``: train a small model, generate with the C++ sampler, benchmark fused vs reference."""
from gptfast.commands import device_arg


def register(subparsers):
    p = subparsers.add_parser(
        "demo", help="train a small code model, sample from it, and benchmark this device (start here)",
        description="Trains a small byte-level model on the Python standard library's sources for a short "
                    "budget (seconds on a GPU, about two minutes on 2 CPU cores; the first steps are timed and "
                    "the step count and learning-rate schedule sized to the budget), reports its validation loss "
                    "on held-out source, generates a sample with the C++ sampling loop, and prints a short table "
                    "of fused vs reference paths on this device.",
    )
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test)")
    p.add_argument("--out", default="runs/demo", help="run directory for the trained model (default: runs/demo)")
    p.add_argument("--device", type=device_arg, help="auto, cpu, cuda or cuda:N (default: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gptfast.demo import run_demo
    from gptfast.runtime.atomic_files import check_output_dir

    check_output_dir(args.out, "--out")

    return run_demo(args.device, quick=args.quick, out_dir=args.out)
