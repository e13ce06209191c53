"""``gptfast train``: pretrain or fine-tune on one device, or many under torchrun.

Settings are layered: ``--preset``, then ``--config FILE`` (TOML or YAML with the keys
of :class:`gptfast.training.TrainConfig`), then the flags given explicitly.
"""
import argparse
import dataclasses
import typing


def _flag_names(field) -> list:
    from gptfast.training.config import flag_name

    names = [flag_name(field.name)]
    extra = field.metadata.get("flag")
    return [extra] + names if extra and extra not in names else names


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key; flags not given stay out of the namespace."""
    from gptfast.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args and typing.get_origin(hint) is typing.Union else hint
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": field.metadata.get("help")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (list, typing.List):
            kwargs.update(nargs="*", metavar="TEXT")
        else:
            kwargs.update(type=base, metavar=field.name.upper())
        parser.add_argument(*_flag_names(field), **kwargs)


def register(subparsers):
    from gptfast.training.config import TRAIN_PRESETS

    p = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune a model (one device, or many with torchrun)",
        description="Pretrain or fine-tune a GPT. With no --data, pretrains on the Python standard library's sources. "
        "Multi-GPU: torchrun --nproc_per_node N -m gptfast train ...",
    )
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="starting settings (default: the built-in defaults)")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (same keys as the flags)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args):
    """Preset, then config file, then explicit flags."""
    from gptfast.training.config import TRAIN_PRESETS, TrainConfig, load_config_file

    file_settings = load_config_file(args.config) if args.config else {}
    preset = args.preset or file_settings.pop("preset", None)
    file_settings.pop("preset", None)
    if preset is not None and preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_dict({**TRAIN_PRESETS.get(preset, {}), **file_settings, **flags})


def run(args) -> int:
    import sys

    from gptfast.training import train

    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except (FileExistsError, FloatingPointError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        print(f"gptfast train: error: {e}", file=sys.stderr)
        return 2
    if result.rank == 0 and result.val_loss is not None:
        import math

        print(f"done: {result.step} steps, val loss {result.val_loss:.4f} (perplexity {math.exp(min(result.val_loss, 700)):.2f}); "
              f"run directory {result.out_dir}")
    return 0
