"""The sampling loop's cost: C++ loop vs its Python twin vs Hugging Face ``generate``.

Random weights, built as a ``transformers.GPT2LMHeadModel`` and loaded into gptfast via
``save_pretrained`` / ``GPT.from_pretrained`` in a temporary directory, so every engine
runs the same weights. Reports, per model shape and batch size:

- end-to-end tokens/s (prefill included; best of ``--repeats`` runs after a warm-up, the
  engines timed round-robin so that load on a shared machine hits them alike);
- per-token overhead: wall time minus the time spent inside the model's forward
  (measured by wrapping ``forward``), divided by the tokens generated (so it includes
  setup, prefill bookkeeping and detokenisation-free result building); on CUDA this
  decomposition is meaningless (asynchronous kernels) and is skipped;
- on CPU, a fourth engine: the C++ loop with the linear layers on ``F.linear`` instead
  of prepacked weights (``gptfast.generate(..., packed_cpu_weights=False)``), to show what
  the loop and what the weight packing each contribute;
- per-token overhead with a stub model step (a fixed logits tensor: no model at all),
  C++ loop vs Python loop, for greedy and for sampled decoding.

Greedy tokens must be identical across all engines (asserted). Every timed call goes
through ``gptfast.bench.harness.host_timed_ms`` (host clock, device synchronised around it).

CPU:   python benchmarks/bench_sampling_loop.py
H200:  python benchmarks/bench_sampling_loop.py --device cuda --dtype bfloat16 --configs gpt2-124M \
           --batch 1 --new-tokens 256 --compile-baseline --count-syncs
       (adds a torch.compile(mode="reduce-overhead") static-cache greedy decode and the
       profiler's count of host syncs per generated token)
"""
import argparse
import datetime
import platform
import sys
import tempfile
import time

import torch

from gptfast.generation import cpu_linear
from gptfast.bench.harness import host_timed_ms

CONFIGS = {  # GPT-2's vocabulary unless said otherwise
    "4x256": dict(n_layer=4, n_embd=256, n_head=4),
    "4x256-bytes": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=256),  # the loop's cost dominates
    "gpt2-124M": dict(n_layer=12, n_embd=768, n_head=12),
}
VOCAB, CONTEXT = 50257, 1024
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def build_models(shape, device, dtype):
    """The same random weights as an HF GPT2LMHeadModel and a gptfast GPT."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptfast.model import GPT

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**{"vocab_size": VOCAB, "n_positions": CONTEXT, **CONFIGS[shape]})).eval()
    hf.generation_config.eos_token_id = None  # every engine runs the full length
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPT.from_pretrained(tmp, device=device, dtype=dtype).eval()
    return hf.to(device=device, dtype=dtype), ours


class ForwardClock:
    """Accumulates the wall time spent inside ``module.forward``."""

    def __init__(self, module):
        self.seconds, inner = 0.0, module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        module.forward = timed


def interleaved_runs(fns, device, repeats):
    """Warm each callable up once, then time them round-robin ``repeats`` times (so load
    drifts on a shared machine hit every engine alike). ``fns``: {name: (callable, clock or
    None)}. Returns {name: (best seconds, seconds outside forward in that run, output)}."""
    outputs = {name: fn() for name, (fn, _) in fns.items()}
    best = {}
    for _ in range(repeats):
        for name, (fn, clock) in fns.items():
            inside_before = clock.seconds if clock else 0.0
            ms, outputs[name] = host_timed_ms(lambda _: fn(), device=device)
            seconds = ms * 1e-3
            outside = seconds - ((clock.seconds - inside_before) if clock else 0.0)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, outside)
    return {name: (*best[name], outputs[name]) for name in fns}


def measure_end_to_end(hf, ours, batch, prompt_len, new_tokens, device, repeats):
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams

    torch.manual_seed(1)
    prompts = torch.randint(0, ours.config.vocab_size, (batch, prompt_len))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    hf_clock, our_clock = ForwardClock(hf), ForwardClock(ours)
    rows, tokens = [], {}

    def ours_run(engine, packed=True):
        def run():
            results = generate(ours, prompts.tolist(), params, engine=engine, packed_cpu_weights=packed)
            return [r.token_ids for r in results]
        return run

    def hf_run():
        out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                          max_new_tokens=new_tokens, do_sample=False)
        return out[:, prompt_len:].tolist()

    engines = {"gptfast C++ loop": (ours_run("cpp"), our_clock),
               "gptfast Python loop": (ours_run("python"), our_clock)}
    if device.type == "cpu" and cpu_linear.applies_to(ours):  # what the packed weights add
        engines["gptfast C++ loop, F.linear"] = (ours_run("cpp", packed=False), our_clock)
    engines["HF generate"] = (hf_run, hf_clock)
    runs = interleaved_runs(engines, device, repeats)
    for name, (seconds, outside, out) in runs.items():
        tokens[name] = out
        overhead = outside / new_tokens * 1e6 if device.type == "cpu" else float("nan")
        rows.append((name, batch * new_tokens / seconds, seconds / new_tokens * 1e3, overhead))
    reference = tokens["gptfast C++ loop"]
    for name, out in tokens.items():
        assert out == reference, f"greedy tokens differ between gptfast C++ loop and {name}"
    return rows


def measure_stub_overhead(batch, new_tokens, device, sampled, repeats):
    """Per-token loop cost with a stub model step that returns fixed logits: {engine: µs}."""
    from gptfast.generation.engines import get_engine
    from gptfast.generation.sampling_params import SamplingParams, build_sampling_tensors, new_decode_state, resolve_seeds
    from gptfast.generation.streaming import HostRows

    kwargs = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1) if sampled else dict(temperature=0.0)
    params = [SamplingParams(max_new_tokens=new_tokens, seed=row, **kwargs) for row in range(batch)]
    prompts = [[1, 2, 3]] * batch
    logits = torch.randn(batch, 1, VOCAB, device=device) * 3

    def loop(engine):
        def run():
            seeds = resolve_seeds(params)
            p = build_sampling_tensors(params, VOCAB, seeds, device, token_table=engine.token_table)
            s = new_decode_state(prompts, params, p, VOCAB, device)
            engine.sample_step(logits, p, s)
            host = HostRows(prompts, params, seeds, s, None, None)
            ms, _ = host_timed_ms(lambda _: engine.decode_loop(p, s, lambda tokens, positions: logits, False,
                                                                host.on_sync, new_tokens - 1, 16, 1), device=device)
            return ms * 1e-3
        return run

    loops = {name: loop(get_engine(name)) for name in ("cpp", "python")}
    best = {}
    for name, run in loops.items():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in loops.items():
            best[name] = min(best.get(name, float("inf")), run())
    return {name: seconds / (new_tokens - 1) * 1e6 for name, seconds in best.items()}


def compile_baseline(ours, prompt_len, new_tokens, device):
    """Greedy decode over gptfast's static KV cache with the step compiled by
    torch.compile(mode="reduce-overhead") (CUDA graphs through cudagraph trees)."""
    step = torch.compile(lambda tok, pos: ours(tok, input_pos=pos)[:, -1].argmax(-1, keepdim=True),
                         mode="reduce-overhead")
    prompt = torch.randint(0, VOCAB, (1, prompt_len), device=device)

    def run():
        ours.setup_cache(1, prompt_len + new_tokens)
        tok = ours(prompt, input_pos=torch.arange(prompt_len, device=device))[:, -1].argmax(-1, keepdim=True)
        pos = torch.full((1, 1), prompt_len, device=device, dtype=torch.long)
        out = [tok]
        for _ in range(new_tokens - 1):
            tok = step(tok, pos).clone()
            pos = pos + 1
            out.append(tok)
        return torch.cat(out, 1)

    seconds, _, _ = interleaved_runs({"compiled": (run, None)}, device, 3)["compiled"]  # warm-up compiles
    return new_tokens / seconds


def count_syncs(ours, prompt_len, new_tokens, device):
    from gptfast.generation.generate import generate
    from gptfast.generation.sampling_params import SamplingParams

    prompt = torch.randint(0, VOCAB, (1, prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    generate(ours, prompt, params)  # warm: graph captured and cached
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        generate(ours, prompt, params)
    syncs = sum(1 for e in prof.events() if e.name in SYNC_EVENTS)
    return syncs / new_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile-baseline", action="store_true", help="CUDA: add torch.compile reduce-overhead decode")
    parser.add_argument("--count-syncs", action="store_true", help="CUDA: profiler host syncs per generated token")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import transformers

    from gptfast.runtime.extension import extension_status

    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.platform()}  "
          f"{torch.get_num_threads()} threads  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"# sampler: {extension_status()}")
    print(f"# {' '.join(sys.argv)}")
    print("\n| model | batch | engine | tokens/s | ms per step | loop overhead µs/token |")
    print("|---|---|---|---|---|---|")
    for shape in args.configs:
        hf, ours = build_models(shape, device, dtype)
        for batch in args.batch:
            for name, tps, ms, overhead in measure_end_to_end(hf, ours, batch, args.prompt_len, args.new_tokens,
                                                               device, args.repeats):
                print(f"| {shape} | {batch} | {name} | {tps:.1f} | {ms:.2f} | {overhead:.0f} |", flush=True)
        if device.type == "cuda" and args.compile_baseline:
            print(f"| {shape} | 1 | torch.compile reduce-overhead greedy | "
                  f"{compile_baseline(ours, args.prompt_len, args.new_tokens, device):.1f} | | |", flush=True)
        if device.type == "cuda" and args.count_syncs:
            print(f"\nhost syncs per token ({shape}, batch 1, {args.new_tokens} tokens): "
                  f"{count_syncs(ours, args.prompt_len, args.new_tokens, device):.3f}")
        del hf, ours

    print("\nStub model step (fixed logits, vocabulary 50257): loop cost per token, µs (best of 5+)")
    print("\n| batch | decoding | C++ loop | Python loop | ratio |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        for sampled in (False, True):
            cost = measure_stub_overhead(batch, args.new_tokens, device, sampled, max(args.repeats, 5))
            cpp, py = cost["cpp"], cost["python"]
            label = "top-k 50, top-p 0.95, T 0.8, rep. 1.1" if sampled else "greedy"
            print(f"| {batch} | {label} | {cpp:.0f} | {py:.0f} | {py / cpp:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
