"""TrainConfig: every numeric setting rejects NaN, infinities and out-of-range values where
settings enter (construction, from_dict, the CLI flags, TOML and YAML files), naming the
setting and its flag."""
import dataclasses
import math
import typing

import pytest

from gptfast.cli import build_parser
from gptfast.commands.train import config_from_args
from gptfast.training.config import TrainConfig, flag_name

# One value out of range per numeric setting (below its minimum, or past its maximum).
OUT_OF_RANGE = {
    "val_fraction": 1.0, "corpus_max_bytes": -1, "n_layer": 0, "n_head": 0, "n_embd": 0, "vocab_size": 0,
    "dropout": 1.0, "block_size": 0, "batch_size": 0, "grad_accum": 0, "max_steps": 0, "lr": 0.0, "min_lr": -1e-4,
    "warmup_steps": -1, "lr_decay_steps": 0, "weight_decay": -0.1, "beta1": 1.0, "beta2": -0.5, "grad_clip": -1.0,
    "seed": 2**32, "log_interval": 0, "eval_interval": -1, "eval_batches": 0, "ckpt_interval": -1,
    "sample_tokens": 0, "sample_temperature": -0.5, "sample_top_k": 0,
}


def numeric_fields():
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for f in dataclasses.fields(TrainConfig):
        base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if base[0] in (int, float):
            names.append(f.name)
    return names


def test_every_numeric_setting_has_an_out_of_range_case():
    assert sorted(OUT_OF_RANGE) == sorted(numeric_fields())


@pytest.mark.parametrize("name", numeric_fields())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "out of range"])
def test_bad_numbers_are_rejected_at_construction_naming_the_flag(name, bad):
    value = OUT_OF_RANGE[name] if bad == "out of range" else bad
    for build in (lambda: TrainConfig(**{name: value}), lambda: TrainConfig.from_dict({name: value})):
        with pytest.raises(ValueError) as e:
            build()
        assert name in str(e.value) and flag_name(name) in str(e.value)


@pytest.mark.parametrize("name", [n for n in numeric_fields()
                                  if typing.get_type_hints(TrainConfig)[n] in (float, typing.Optional[float])])
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_cli_flags_reject_nan_and_inf(name, text):
    args = build_parser().parse_args(["train", f"{flag_name(name)}={text}"])
    with pytest.raises(ValueError, match=flag_name(name)):
        config_from_args(args)


@pytest.mark.parametrize("name, value", sorted(OUT_OF_RANGE.items()))
def test_cli_flags_reject_out_of_range_values(name, value):
    args = build_parser().parse_args(["train", f"{flag_name(name)}={value}"])
    with pytest.raises(ValueError, match=flag_name(name)):
        config_from_args(args)


def test_config_files_reject_nan_and_inf(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("grad_clip = nan\n")
    with pytest.raises(ValueError, match="--grad-clip"):
        config_from_args(build_parser().parse_args(["train", "--config", str(toml)]))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("weight-decay: .inf\n")
    with pytest.raises(ValueError, match="--weight-decay"):
        config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file)]))
    yaml_file.write_text("sample_temperature: .nan\n")
    with pytest.raises(ValueError, match="--sample-temperature"):
        config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file)]))


def test_grad_clip_nan_no_longer_turns_clipping_off():
    with pytest.raises(ValueError, match=r"grad_clip must be a finite number >= 0 \(0: off\), got nan \(--grad-clip\)"):
        TrainConfig(grad_clip=float("nan"))


def test_boundary_values_are_accepted():
    cfg = TrainConfig(grad_clip=0.0, weight_decay=0.0, warmup_steps=0, eval_interval=0, ckpt_interval=0, dropout=0.0,
                      beta1=0.0, sample_temperature=0.0, corpus_max_bytes=0, seed=0, min_lr=0.0, max_steps=1)
    assert cfg.grad_clip == 0.0 and cfg.min_lr == 0.0


@pytest.mark.parametrize("value, message", [
    ("mps", "gptfast runs on"), ("foo", "is not a device name"), ("cuda:x", "is not a device name"), (3, "must be"),
])
def test_device_setting_is_checked_at_construction(value, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(device=value)
    assert "--device" in str(e.value)


@pytest.mark.parametrize("value", ["inf", "nan", "-3", "0"])
def test_mfu_peak_must_be_a_positive_finite_number(value):
    with pytest.raises(ValueError, match="--mfu-peak"):
        TrainConfig(mfu_peak=value)
