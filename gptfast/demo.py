"""``gptfast demo``: the whole engine in one command.

1. **Train** a small byte-level code model on the embedded corpus (the Python standard
   library's own sources) within a time budget: seconds on a GPU (fused Triton kernels,
   bf16 autocast), about two minutes on two CPU cores. The first few steps are timed
   (a short run of the same training configuration), and the run is then sized to the
   budget: the progress bar counts the steps it will run, and the warmup + cosine
   learning-rate schedule reaches its minimum on the last of them. The validation loss
   printed at the end is in nats per token (per byte) on held-out Python source, next to
   what a uniform guess over the vocabulary would score.
2. **Generate** a continuation of a code prompt with the C++ sampling loop
   (``gptfast.generate``; its Python twin if the extension cannot be built here).
3. **Benchmark** fused against reference paths on this device: the Triton kernels on a
   GPU; on a CPU (where the kernels would only run through the interpreter) the C++
   sampler and loop against their Python twins and the torch backend against the reference.
"""
import contextlib
import io
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import torch

from gptfast.bench.runner import CORE, Case


@dataclass
class DemoPlan:
    """Sizes of one demo run on one device."""

    train_seconds: float  # budget of the training steps (timing them included)
    max_steps: int  # the most steps a run takes however fast the device
    batch_size: int
    overrides: dict  # model shape on top of the "tiny" preset
    corpus_max_bytes: int
    sample_tokens: int
    bench_target_ms: float
    lr: float = 2e-3  # peak; the cosine decays to lr / 10
    warmup_steps: int = 20  # at most; never more than a tenth of the run
    timing_steps: int = 6  # steps of the timing run; the first two (warm-up, compiles) are not counted
    min_steps: int = 10  # the fewest steps a run takes however slow the device
    eval_batches: int = 64  # validation batches at the end: the whole held-out split of these corpus sizes


def plan_for(device: torch.device, quick: bool) -> DemoPlan:
    if device.type == "cuda":
        return DemoPlan(train_seconds=5 if quick else 30, max_steps=3000, batch_size=32,
                        overrides=dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
                        corpus_max_bytes=4_000_000, sample_tokens=64 if quick else 200, bench_target_ms=100)
    if quick:  # the test suite's budget: everything in well under a minute
        return DemoPlan(train_seconds=6, max_steps=300, batch_size=8, overrides={}, corpus_max_bytes=300_000,
                        sample_tokens=24, bench_target_ms=20, timing_steps=4, eval_batches=8)
    return DemoPlan(train_seconds=100, max_steps=5000, batch_size=16, overrides=CPU_MODEL, corpus_max_bytes=2_000_000,
                    sample_tokens=160, bench_target_ms=100)


# The CPU demo's model (on the "tiny" preset's 128-token context, 16 sequences a step).
# Chosen among 2x64, 2x96, 3x96, 4x128 and 4x192 by validation loss after a full
# schedule of the steps each affords in the CPU budget (wider or deeper models take
# fewer, slower steps and ended worse); the comparison is in the commit that set it.
CPU_MODEL = dict(n_layer=2, n_head=3, n_embd=96)


# ---------------------------------------------------------------------------------
# 1. training
# ---------------------------------------------------------------------------------


@dataclass
class Schedule:
    """The training run the budget allows: ``steps`` optimizer steps, linear warmup over
    ``warmup_steps``, cosine decay reaching the minimum learning rate at the last step."""

    steps: int
    warmup_steps: int
    step_seconds: float  # the timed seconds per step it was sized from

    @property
    def lr_decay_steps(self) -> int:
        # lr_at(step) is the rate of 0-based step ``step``; it is the minimum from
        # lr_decay_steps on, so the last step (steps - 1) runs at the minimum.
        return self.steps - 1


def size_schedule(step_seconds: float, seconds_left: float, plan: DemoPlan) -> Schedule:
    """As many steps as fit in ``seconds_left`` at ``step_seconds`` each, within
    ``[plan.min_steps, plan.max_steps]``."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds}")
    fits = int(max(0.0, seconds_left) / step_seconds)
    steps = max(plan.min_steps, min(plan.max_steps, fits))
    return Schedule(steps=steps, warmup_steps=max(1, min(plan.warmup_steps, steps // 10)), step_seconds=step_seconds)


def _train_config(device: torch.device, plan: DemoPlan, out_dir: str, **changes):
    from gptfast.training import TrainConfig

    settings = dict(
        model="tiny", **plan.overrides, batch_size=plan.batch_size, lr=plan.lr, corpus_max_bytes=plan.corpus_max_bytes,
        eval_interval=0, eval_batches=plan.eval_batches, ckpt_interval=0, sample_prompts=[], out_dir=out_dir,
        overwrite=True, device=str(device), log_interval=25,
    )
    return TrainConfig(**{**settings, **changes})


def time_steps(device: torch.device, plan: DemoPlan) -> float:
    """Seconds per optimizer step of the demo's training configuration on ``device``: the
    median step of a run of ``plan.timing_steps`` steps (into a temporary directory,
    nothing exported, its console output dropped), the first two left out (they hold the
    warm-up: allocations, Triton compiles)."""
    from gptfast.training import train

    marks: List[float] = []
    with tempfile.TemporaryDirectory(prefix="gptfast-demo-timing-") as tmp:
        cfg = _train_config(device, plan, tmp, max_steps=plan.timing_steps, warmup_steps=1, eval_batches=1,
                            progress=False, export=False, log_interval=plan.timing_steps)
        # The callback makes every step end in a host sync (its loss), so the marks are step times.
        # The run's own report (model, data, its loss) would only repeat the real run's.
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg, callback=lambda info: marks.append(time.perf_counter()))
    counted = marks[1:]
    if len(counted) < 2:
        raise RuntimeError(f"timing run ended after {len(marks)} steps")
    gaps = sorted(b - a for a, b in zip(counted, counted[1:]))
    return gaps[len(gaps) // 2]


def describe_loss(val_loss: float, vocab_size: int) -> str:
    """What a validation loss means, in one line."""
    uniform = math.log(vocab_size)
    return (f"validation loss {val_loss:.3f} nats per token (per byte: the model reads bytes) on held-out Python "
            f"source, never trained on: perplexity {math.exp(val_loss):.2f}, {val_loss / math.log(2):.2f} bits "
            f"per byte; a uniform guess over the {vocab_size} byte values scores ln {vocab_size} = {uniform:.3f}")


@dataclass
class DemoTraining:
    result: object  # gptfast.training.TrainResult
    schedule: Schedule
    lrs: List[float]  # the learning rate of every step run
    losses: List[float]  # the training loss of every step run


def train_model(device: torch.device, plan: DemoPlan, out_dir: str, log=print) -> DemoTraining:
    """Time a few steps, size the schedule to what is left of the budget, train."""
    from gptfast.training import train

    started = time.perf_counter()
    step_seconds = time_steps(device, plan)
    schedule = size_schedule(step_seconds, plan.train_seconds - (time.perf_counter() - started), plan)
    cfg = _train_config(device, plan, out_dir, max_steps=schedule.steps, warmup_steps=schedule.warmup_steps,
                        lr_decay_steps=schedule.lr_decay_steps)
    log(f"timed {step_seconds * 1e3:.0f} ms per step: training {schedule.steps} steps of {plan.batch_size} sequences, "
        f"learning rate warming up over {schedule.warmup_steps} steps to {cfg.lr:.1e}, then cosine decay to "
        f"{cfg.final_lr:.1e} at the last step")
    lrs: List[float] = []
    losses: List[float] = []

    def record(info) -> bool:
        lrs.append(info.lr)
        losses.append(info.loss)
        return False  # the schedule is sized to the budget: run every step of it

    result = train(cfg, callback=record)
    elapsed = time.perf_counter() - started
    trend = f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no training loss reported"
    log(f"trained {result.step} steps in {elapsed:.1f} s (timing included): {trend}")
    if result.val_loss is not None:
        log(describe_loss(result.val_loss, result.model.config.vocab_size))
    return DemoTraining(result, schedule, lrs, losses)


# ---------------------------------------------------------------------------------
# 2. generation
# ---------------------------------------------------------------------------------


def generate_sample(model, tokenizer, plan: DemoPlan, prompt: str = "def ") -> str:
    import gptfast
    from gptfast.runtime.extension import extension_status

    room = model.config.block_size - len(tokenizer.encode(prompt))  # the sample must fit the context
    params = gptfast.SamplingParams(max_new_tokens=min(plan.sample_tokens, room), temperature=0.8, top_k=40, seed=0)
    result = gptfast.generate(model.eval(), [prompt], params, tokenizer=tokenizer)[0]
    return f"sampler: {extension_status()}\n--- sample ---\n{prompt}{result.text}\n--------------"


# ---------------------------------------------------------------------------------
# 3. benchmark
# ---------------------------------------------------------------------------------


def _model_forward(model, backend, batch, seq_len, device):
    model.set_backend(backend)
    idx = [torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device) for _ in range(2)]

    def run(x):
        with torch.no_grad():
            return model(x)

    return run, idx


def _generation(model, engine, new_tokens, device):
    import gptfast

    params = gptfast.SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    if engine == "cpp":
        from gptfast.runtime.extension import load_extension

        if load_extension() is None:
            from gptfast.bench.runner import SkipCase

            raise SkipCase("C++ sampling extension unavailable")
    return (lambda _: gptfast.generate(model, [[10, 11, 12, 13]], params, engine=engine)), [None]


def benchmark_cases(model, device: torch.device, plan: DemoPlan) -> List[Case]:
    """A short list of fused-vs-reference comparisons that mean something on ``device``."""
    from gptfast.bench.suites import causal_attention, decode_attention, layer_norm, sampler

    timing = dict(target_ms=plan.bench_target_ms, min_reps=3, max_reps=50, warmup=2)
    cases: List[Case] = []

    def add(op, provider, shape, dtype, build, mode="fwd", **extra):
        cases.append(Case(op=op, provider=provider, mode=mode, shape=shape, dtype=dtype, build=build, priority=CORE,
                          **{**timing, **extra}))

    if device.type == "cuda":
        bf16 = torch.bfloat16
        for provider in ("gptfast", "reference", "torch"):
            add("layer_norm", provider, "16384x768", "bfloat16",
                partial(layer_norm._build, provider, "fwd+bwd", 16384, 768, bf16, device), mode="fwd+bwd")
        for provider in ("gptfast", "reference", "torch"):
            add("causal_attention", provider, "B=8,H=12,T=1024,D=64", "bfloat16",
                partial(causal_attention._build, provider, "fwd+bwd", 8, 12, 1024, 64, bf16, device), mode="fwd+bwd")
        for provider in ("gptfast", "reference", "torch"):
            add("decode_attention", provider, "B=8,H=12,L=4096,D=64", "bfloat16",
                partial(decode_attention._build, provider, 8, 12, 4096, 64, bf16, device), cuda_graph=True)
        model_backends = ("fused", "reference", "torch")
    else:
        model_backends = ("torch", "reference")
    for provider in ("cpp", "python-twin"):
        add("sampler_step", provider, "B=1,V=50257,sampled", "float32",
            partial(sampler._build, provider, 1, "sampled", device), mode="step", cuda_graph=True)
    seq_len = min(128, model.config.block_size)
    for backend in model_backends:
        add("model forward", backend, f"B=4,T={seq_len}", str(next(model.parameters()).dtype).replace("torch.", ""),
            partial(_model_forward, model, backend, 4, seq_len, device))
    for engine, name in (("cpp", "cpp-loop"), ("python", "python-twin")):
        add("generate 32 tokens", name, "B=1", "-", partial(_generation, model, engine, 32, device), mode="e2e",
            warmup=1, max_reps=5)
    return cases


def benchmark_table(rows, skipped) -> str:
    """Op, shape, provider, median time and the speedup of each row against the slowest of its op."""
    lines = ["| op | shape | provider | median ms | vs slowest |", "|---|---|---|---|---|"]
    slowest = {}
    for r in rows:
        slowest[r.op] = max(slowest.get(r.op, 0.0), r.time_ms)
    for r in rows:
        lines.append(f"| {r.op} {r.mode} | {r.shape} | {r.provider} | {r.time_ms:.3g} | "
                     f"{slowest[r.op] / r.time_ms:.2f}× |")
    for s in skipped:
        lines.append(f"| {s.op} {s.mode} | {s.shape} | {s.provider} | skipped: {s.reason} | |")
    return "\n".join(lines)


def run_demo(device: Optional[torch.device] = None, quick: bool = False, out_dir: str = "runs/demo", log=print) -> int:
    from gptfast.bench import environment, runner

    device = device or environment.default_device()
    plan = plan_for(device, quick)
    log(f"gptfast demo on {environment.device_name(device)}{' (quick)' if quick else ''}")
    log(f"\n[1/3] training a small code model on the Python standard library for ~{plan.train_seconds:.0f} s")
    result = train_model(device, plan, out_dir, log=log).result
    model = result.model.eval()

    log("\n[2/3] generating with the C++ sampling loop (gptfast.generate)")
    log(generate_sample(model, result.tokenizer, plan))

    log("\n[3/3] fused vs reference paths on this device")
    if device.type != "cuda":
        log("(no GPU: the Triton kernels would only run through the interpreter, whose speed means nothing;\n"
            " this table compares the C++ sampler and loop with their Python twins and the torch backend with\n"
            " the reference. `gptfast bench` and `gptfast check` do more.)")
    peaks = {}  # the demo reports times and speedups, not fractions of peak
    meta = {"device": environment.device_name(device), "versions": environment.versions(),
            "git_commit": environment.git_commit(), "timestamp": environment.timestamp(), "peaks": peaks}
    rows, skipped = runner.run_cases(benchmark_cases(model, device, plan), device, meta)
    log(benchmark_table(rows, skipped))
    log(f"\nthe trained model is in {result.out_dir} (Hugging Face format); try:\n"
        f"  gptfast generate --model {result.out_dir} --prompt 'import '")
    return 0
