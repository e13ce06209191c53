"""Profiling with torch.profiler: a Chrome/Perfetto trace, a key-averages table and a summary.

``profile_steps(step, ...)`` runs ``step()`` under ``torch.profiler.profile`` with a
schedule (``wait`` steps ignored, ``warmup`` steps traced but discarded, ``active`` steps
recorded) and writes, into ``out_dir``:

- ``trace.json``: Chrome trace format; open it in https://ui.perfetto.dev or chrome://tracing;
- ``key_averages.txt``: torch's table of ops, sorted by device time (CPU time without CUDA);
- ``summary.json``: the numbers below.

The summary reads the recorded events:

- **time per phase**: the ``record_function`` ranges named in ``PHASES`` (prefill, decode,
  sample in generation; forward, backward, optimizer in training), their host time and,
  on CUDA, the device time of the kernels launched inside them. Ranges may nest.
- **kernel time vs host gaps** (CUDA): the union of all kernel intervals against the wall
  time of the recorded steps; the rest is time the GPU sat idle waiting for the host.
- **host syncs**: on CUDA the calls that block the host on the device
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize`` and blocking
  ``cudaMemcpy``); on the CPU, ``aten::_local_scalar_dense`` (what ``.item()``, ``int(t)`` and
  ``bool(t)`` call). Divided by the tokens generated in the recorded steps when given.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.autograd import DeviceType

PHASES = ("prefill", "decode", "sample", "forward", "backward", "optimizer")
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
CPU_SYNC_OPS = ("aten::_local_scalar_dense",)


@dataclass
class PhaseTime:
    count: int = 0
    host_ms: float = 0.0
    device_ms: Optional[float] = None


@dataclass
class ProfileSummary:
    what: str
    device: str
    device_type: str
    active_steps: int
    wall_ms: float
    phases: Dict[str, PhaseTime] = field(default_factory=dict)
    kernel_ms: Optional[float] = None
    host_gap_ms: Optional[float] = None
    host_syncs: int = 0
    sync_events: Dict[str, int] = field(default_factory=dict)
    generated_tokens: Optional[int] = None
    host_syncs_per_token: Optional[float] = None
    trace: str = ""
    table: str = ""

    def to_dict(self) -> Dict:
        return asdict(self)

    def text(self) -> str:
        lines = [f"profile of {self.what} on {self.device}: {self.active_steps} recorded step(s), "
                 f"{self.wall_ms:.2f} ms wall"]
        if self.phases:
            lines.append("time per phase (ranges may nest):")
            for name, p in self.phases.items():
                device = "" if p.device_ms is None else f", device {p.device_ms:.2f} ms"
                lines.append(f"  {name:<10} x{p.count:<5} host {p.host_ms:.2f} ms{device}")
        else:
            lines.append(f"no phase ranges ({', '.join(PHASES)}) were recorded")
        if self.kernel_ms is not None:
            share = 100 * self.kernel_ms / self.wall_ms if self.wall_ms else 0.0
            lines.append(f"kernel time {self.kernel_ms:.2f} ms ({share:.0f}% of wall), "
                         f"host gaps {self.host_gap_ms:.2f} ms")
        else:
            lines.append("kernel time vs host gaps: needs CUDA (on the CPU, ops run on the host)")
        syncs = ", ".join(f"{k} x{v}" for k, v in self.sync_events.items()) or "none"
        lines.append(f"host syncs: {self.host_syncs} ({syncs})")
        if self.host_syncs_per_token is not None:
            lines.append(f"host syncs per generated token: {self.host_syncs_per_token:.3f} "
                         f"({self.generated_tokens} tokens)")
        lines.append(f"trace: {self.trace}  (open in https://ui.perfetto.dev)")
        lines.append(f"table: {self.table}")
        return "\n".join(lines)


def _device_ms(event) -> float:
    value = getattr(event, "device_time_total", None)
    if value is None:
        value = getattr(event, "cuda_time_total", 0.0)
    return value / 1e3


def _union_ms(intervals) -> float:
    """Total length of the union of (start, end) intervals in microseconds, in ms."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total / 1e3


def summarize(events, what: str, device: torch.device, active_steps: int,
              generated_tokens: Optional[int] = None) -> ProfileSummary:
    """The summary of recorded profiler events (see the module docstring)."""
    cuda = device.type == "cuda"
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e for e in host_events if e.name.startswith("ProfilerStep#")]
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    spans = steps or host_events
    if spans:
        # From the first step's start to whatever ends last: the host's steps, or the
        # kernels they queued (the host does not wait for them at a step's end).
        start = min(e.time_range.start for e in spans)
        end = max([e.time_range.end for e in spans] + [k[1] for k in kernels])
        wall_us = end - start
    else:
        wall_us = 0.0
    phases: Dict[str, PhaseTime] = {}
    for e in host_events:
        if e.name in PHASES:
            p = phases.setdefault(e.name, PhaseTime(device_ms=0.0 if cuda else None))
            p.count += 1
            p.host_ms += e.time_range.elapsed_us() / 1e3
            if cuda:
                p.device_ms += _device_ms(e)
    phases = {name: phases[name] for name in PHASES if name in phases}

    summary = ProfileSummary(what, str(device), device.type, active_steps, wall_us / 1e3, phases)
    if cuda:
        summary.kernel_ms = _union_ms(kernels)
        summary.host_gap_ms = max(summary.wall_ms - summary.kernel_ms, 0.0)
        names = CUDA_SYNC_CALLS
    else:
        names = CPU_SYNC_OPS
    for e in host_events:
        if e.name in names:
            summary.sync_events[e.name] = summary.sync_events.get(e.name, 0) + 1
    summary.host_syncs = sum(summary.sync_events.values())
    if generated_tokens:
        summary.generated_tokens = generated_tokens
        summary.host_syncs_per_token = summary.host_syncs / generated_tokens
    return summary


class StepProfiler:
    """torch.profiler with a schedule, stepped by the caller: ``tick()`` after every step.

    ``wait`` steps are ignored, ``warmup`` steps traced and discarded, ``active`` steps
    recorded; ``done`` turns True after the last active step, and ``finish()`` writes the
    trace, the table and the summary into ``out_dir``. ``tick(tokens)`` takes the tokens
    the step generated (for host syncs per token).
    """

    def __init__(self, *, what: str, device, out_dir: str, wait: int = 0, warmup: int = 1, active: int = 1,
                 row_limit: int = 30):
        if active < 1 or warmup < 0 or wait < 0:
            raise ValueError(f"profile schedule needs active >= 1, warmup >= 0, wait >= 0 (got {active}, {warmup}, {wait})")
        self.what, self.device, self.out_dir = what, torch.device(device), out_dir
        self.wait, self.warmup, self.active, self.row_limit = wait, warmup, active, row_limit
        self.trace_path = os.path.join(out_dir, "trace.json")
        self.table_path = os.path.join(out_dir, "key_averages.txt")
        self.steps_done = 0
        self.tokens: List[int] = []
        self._events = None
        os.makedirs(out_dir, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self._prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._on_trace_ready)
        self._prof.start()

    @property
    def total_steps(self) -> int:
        return self.wait + self.warmup + self.active

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    def _on_trace_ready(self, prof) -> None:
        prof.export_chrome_trace(self.trace_path)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with open(self.table_path, "w") as f:
            f.write(prof.key_averages().table(sort_by=sort_by, row_limit=self.row_limit))
        self._events = list(prof.events())

    def tick(self, tokens: Optional[int] = None) -> bool:
        """Mark the end of a step (no device synchronisation: it would count as a host sync)."""
        if self.done:
            return True
        if self.steps_done >= self.wait + self.warmup and tokens:
            self.tokens.append(int(tokens))
        self.steps_done += 1
        self._prof.step()
        return self.done

    def abort(self) -> None:
        """Stop profiling after a failed step, writing nothing."""
        self._prof.stop()

    def finish(self) -> ProfileSummary:
        self._prof.stop()
        if self._events is None:
            raise RuntimeError(f"the profiler recorded no active step ({self.steps_done} of {self.total_steps} steps ran)")
        summary = summarize(self._events, self.what, self.device, self.active, sum(self.tokens) if self.tokens else None)
        summary.trace, summary.table = self.trace_path, self.table_path
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
        return summary


def profile_steps(step: Callable[[], Optional[int]], *, what: str, device, out_dir: str, wait: int = 0,
                  warmup: int = 1, active: int = 1) -> ProfileSummary:
    """Profile ``wait + warmup + active`` calls of ``step()`` (which may return the tokens it generated)."""
    profiler = StepProfiler(what=what, device=device, out_dir=out_dir, wait=wait, warmup=warmup, active=active)
    try:
        while not profiler.done:
            profiler.tick(step())
    except BaseException:
        profiler.abort()
        raise
    return profiler.finish()


# ---------------------------------------------------------------------------------
# Workloads: generation, training, one op
# ---------------------------------------------------------------------------------


def build_model(device, *, model_dir=None, preset=None, dtype=None, backend=None):
    """A local checkpoint (gptfast.checkpoints.loader), or a randomly initialised preset (gpt2 in bf16
    on CUDA, tiny in fp32 on the CPU)."""
    from gptfast.checkpoints.loader import load_model_and_tokenizer

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = preset or ("gpt2" if device.type == "cuda" else "tiny")
    return load_model_and_tokenizer(model_dir, preset=preset, backend=backend, device=device, dtype=dtype).model.eval()


def generation_step(model, batch: int, prompt_len: int, new_tokens: int):
    """A callable that generates ``new_tokens`` greedy tokens for ``batch`` random prompts and
    returns how many tokens it generated, with the C++ loop (``gptfast.generate``)."""
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams

    if prompt_len + new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceed the model's context "
                         f"({model.config.block_size})")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def step() -> int:
        generate(model, prompts, params)
        return batch * new_tokens

    return step


def profile_generate(out_dir: str, *, device, model=None, batch: int = 1, prompt_len: int = 16, new_tokens: int = 64,
                     warmup: int = 1, active: int = 1) -> ProfileSummary:
    model = model if model is not None else build_model(device)
    step = generation_step(model, batch, prompt_len, new_tokens)
    what = f"generate (batch {batch}, {prompt_len}-token prompts, {new_tokens} new tokens, {model.backend} backend)"
    return profile_steps(step, what=what, device=device, out_dir=out_dir, warmup=warmup, active=active)


def profile_train(out_dir: str, *, device, preset: Optional[str] = None, batch: int = 8, seq_len: Optional[int] = None,
                  wait: int = 1, warmup: int = 1, active: int = 3, corpus_max_bytes: int = 300_000) -> ProfileSummary:
    """Profile ``gptfast.training.train`` steps on the embedded corpus (a short throwaway run under ``out_dir/run``)."""
    from gptfast.training import TrainConfig, train

    device = torch.device(device)
    preset = preset or ("gpt2" if device.type == "cuda" else "tiny")
    cfg = TrainConfig(model=preset, batch_size=batch, block_size=seq_len, max_steps=wait + warmup + active,
                      warmup_steps=1, eval_interval=0, eval_batches=1, ckpt_interval=0, export=False, progress=False,
                      sample_prompts=[], out_dir=os.path.join(out_dir, "run"), overwrite=True,
                      device=device.type, corpus_max_bytes=corpus_max_bytes, log_interval=1000)
    tokens_per_step = batch * cfg.grad_accum * (seq_len or _preset_block_size(preset))
    profiler = StepProfiler(what=f"train ({preset}, batch {batch}, {tokens_per_step // batch} tokens per sequence)",
                            device=device, out_dir=out_dir, wait=wait, warmup=warmup, active=active)
    try:
        train(cfg, callback=lambda info: profiler.tick())
    except BaseException:
        profiler.abort()
        raise
    return profiler.finish()


def _preset_block_size(preset: str) -> int:
    from gptfast.config import GPTConfig

    return GPTConfig.from_preset(preset).block_size


def op_step(name: str, device, dtype=None):
    """A forward (+ backward, for ops with gradients) step of one registry op on its
    large example inputs on CUDA, its small ones on the CPU."""
    from gptfast.ops import registry

    spec = registry.get(name)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    op = spec.resolve("fused")
    inputs = spec.example_inputs(device, dtype, large=device.type == "cuda")
    grad_inputs = [inputs[n] for n in spec.grad_inputs]

    def step():
        with torch.profiler.record_function("forward"):
            out = op(*inputs.values())
        if grad_inputs:
            with torch.profiler.record_function("backward"):
                torch.autograd.grad(out, grad_inputs, torch.ones_like(out))
        return None

    return step


def profile_op(name: str, out_dir: str, *, device, dtype=None, warmup: int = 2, active: int = 5) -> ProfileSummary:
    step = op_step(name, device, dtype)
    return profile_steps(step, what=f"op {name}", device=device, out_dir=out_dir, warmup=warmup, active=active)
