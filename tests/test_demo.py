"""`gptfast demo`: runs end to end on the CPU (trains, samples, benchmarks), sizes its
training run to the time budget (the progress bar counts the steps it runs, the learning
rate reaches its minimum at the last one) and says what its validation loss means."""
import dataclasses
import json
import math
import re

import pytest
import torch

from gptfast import cli
from gptfast.demo import DemoPlan, Schedule, describe_loss, plan_for, size_schedule, train_model
from gptfast.optim import lr_at
from gptfast.training import TrainConfig

CPU = torch.device("cpu")


def bar_counts(stderr: str):
    """(done, total) of the training progress bar's last state."""
    states = re.findall(r"train:[^\r\n]*?(\d+)/(\d+) \[", stderr)
    assert states, f"no progress bar in {stderr[-2000:]!r}"
    return tuple(int(n) for n in states[-1])


def test_demo_quick_finishes_on_cpu(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "[1/3] training" in printed and "training loss" in printed
    planned = int(re.search(r"ms per step: training (\d+) steps", printed).group(1))
    ran = int(re.search(r"trained (\d+) steps", printed).group(1))
    assert planned == ran and bar_counts(captured.err) == (ran, ran)
    assert "nats per token" in printed and f"ln 256 = {math.log(256):.3f}" in printed
    assert "--- sample ---" in printed and "sampler:" in printed
    assert "| op | shape | provider | median ms |" in printed
    assert "sampler_step" in printed and "model forward" in printed and "generate" in printed
    # The trained model was exported in Hugging Face format, ready for `gptfast generate --model`.
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] >= 1


def test_training_runs_the_whole_schedule_down_to_the_minimum_lr(tmp_path, capsys):
    plan = dataclasses.replace(plan_for(CPU, quick=True), train_seconds=2.0, min_steps=12, max_steps=40)
    trained = train_model(CPU, plan, str(tmp_path / "run"), log=lambda *_: None)
    steps = trained.schedule.steps
    assert 12 <= steps <= 40
    assert trained.result.step == len(trained.lrs) == steps
    assert bar_counts(capsys.readouterr().err) == (steps, steps)
    assert max(trained.lrs) == pytest.approx(plan.lr)
    assert trained.lrs[-1] == pytest.approx(plan.lr / 10)  # the minimum, at the last step run
    peak = trained.lrs.index(max(trained.lrs))
    assert all(a >= b for a, b in zip(trained.lrs[peak:], trained.lrs[peak + 1:]))  # decays, never rises
    assert all(lr > plan.lr / 10 for lr in trained.lrs[peak:-1])  # and only the last step is at the minimum
    assert trained.result.val_loss is not None and math.isfinite(trained.result.val_loss)


PLAN = DemoPlan(train_seconds=100, max_steps=5000, batch_size=16, overrides={}, corpus_max_bytes=0, sample_tokens=1,
                bench_target_ms=1)


@pytest.mark.parametrize("step_seconds,seconds_left,steps", [
    (0.0625, 98.0, 1568),  # what fits
    (0.001, 98.0, 5000),  # a fast device: capped at max_steps
    (5.0, 98.0, 19),
    (30.0, 98.0, 10),     # a slow device: at least min_steps
    (0.0625, -3.0, 10),   # the timing run took the whole budget
])
def test_schedule_fits_the_budget(step_seconds, seconds_left, steps):
    schedule = size_schedule(step_seconds, seconds_left, PLAN)
    assert schedule.steps == steps
    assert 1 <= schedule.warmup_steps <= max(1, steps // 10) and schedule.warmup_steps <= PLAN.warmup_steps
    if steps > PLAN.min_steps:
        assert schedule.steps * step_seconds <= seconds_left


@pytest.mark.parametrize("steps", [10, 19, 1568])
def test_schedule_reaches_the_minimum_lr_at_the_last_step(steps):
    schedule = Schedule(steps=steps, warmup_steps=max(1, min(20, steps // 10)), step_seconds=0.1)
    cfg = TrainConfig(max_steps=schedule.steps, warmup_steps=schedule.warmup_steps,
                      lr_decay_steps=schedule.lr_decay_steps, lr=2e-3)
    lrs = [lr_at(step, cfg) for step in range(schedule.steps)]
    assert lrs[schedule.warmup_steps - 1] == pytest.approx(2e-3)
    assert lrs[-1] == cfg.final_lr == pytest.approx(2e-4)
    assert lrs[-2] > cfg.final_lr


def test_schedule_rejects_a_non_positive_step_time():
    with pytest.raises(ValueError, match="step_seconds must be positive, got 0"):
        size_schedule(0, 100, PLAN)


def test_loss_is_explained_against_a_uniform_guess():
    line = describe_loss(1.0, 256)
    assert "1.000 nats per token" in line and "held-out Python source" in line
    assert f"perplexity {math.e:.2f}" in line and f"{1 / math.log(2):.2f} bits per byte" in line
    assert "uniform guess over the 256 byte values scores ln 256 = 5.545" in line


def test_demo_sample_is_capped_to_the_model_context():
    # The full CPU plan asks for more tokens than the tiny model's context holds.
    from gptfast import GPT, GPTConfig
    from gptfast.demo import generate_sample
    from gptfast.tokenizer import ByteTokenizer

    plan = dataclasses.replace(plan_for(CPU, quick=True), sample_tokens=500)
    model = GPT(GPTConfig.from_preset("tiny", block_size=16))
    text = generate_sample(model, ByteTokenizer(), plan, prompt="def ")
    assert "--- sample ---" in text
