"""The ``gptfast`` command line. Each verb lives in ``gptfast/commands/<verb>.py``, which
exposes ``register(subparsers)`` and ``run(args) -> int``."""
import argparse
import sys

from gptfast.commands import bench, check, demo, generate, info, profile, quantize, train
from gptfast.commands import eval as eval_command

# The verbs in the order `gptfast --help` lists them.
COMMANDS = (info, generate, bench, check, profile, demo, train, eval_command, quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description="gptfast: a fast GPT-2-family engine")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # OSError: a path named in the message
        # Bad input gets one clear line, not a traceback (GPTFAST_DEBUG=1 shows it).
        import os

        if os.environ.get("GPTFAST_DEBUG") == "1":
            raise
        print(f"gptfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
