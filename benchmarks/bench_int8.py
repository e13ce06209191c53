"""Weight-only int8 (issue 14): accuracy on a trained model and CPU decode speed.

Accuracy: trains the ``tiny`` preset with ``gptfast.training.train`` on the embedded
standard-library corpus (or reuses the run directory), then reports the validation
perplexity of the fp32 model and of its int8 copy (``gptfast.quantize``), and over
``--prompts`` prompts cut from the validation split the fraction whose 64 greedy tokens
agree exactly (and the mean length of the agreeing prefix).

Speed: GPT-2 124M shapes with random weights, greedy, on the CPU, at batch 1, 8 and 64
(``--batches``): decode tokens/s (all rows) of the int8 model and of gptfast's fp32 model
(``gptfast.generate``, weights prepacked for the C++ kernels of csrc/cpu_linear.cpp, fp32 and int8) and
of Hugging Face ``generate`` on a ``GPT2LMHeadModel`` built from the same config (no
download). Decode time = time(prompt + N new tokens) - time(prompt + 1 new token), so
prefill is left out; ``--runs`` runs, the three engines interleaved within each run, min /
median / max, with the load average. At batch 1 it prints each gptfast engine's median as
a percentage of two read-bandwidth limits, each a read rate divided by the linear weights'
bytes per step: the rate of a sum over 1 GiB (memory), and that of a sum over a buffer of
the weights' own size (where they fit the last-level cache, as GPT-2's 124 MB of int8
weights may, they are read from it between steps, faster than from memory).

    PYTHONPATH=$PWD python benchmarks/bench_int8.py [--skip accuracy] [--new-tokens 64] [--runs 3] [--batches 1,8,64]
"""
import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time

import torch

from gptfast.config import GPTConfig
from gptfast.generation.generate import generate
from gptfast.model import GPT
from gptfast.runtime.paths import cache_dir
from gptfast.quantization import quantize
from gptfast.generation.sampling_params import SamplingParams

PROMPT_LEN = 16


def trained_model(run_dir):
    from gptfast.checkpoints.loader import load_model_and_tokenizer
    from gptfast.checkpoints.training_state import checkpoint_path
    from gptfast.training import TrainConfig, train

    if not checkpoint_path(run_dir).exists():
        print(f"training the tiny preset into {run_dir} ...", flush=True)
        train(TrainConfig.from_preset("tiny", out_dir=str(run_dir)))
    loaded = load_model_and_tokenizer(run_dir, backend="torch")
    return loaded.model.eval(), loaded.tokenizer_path


def greedy(model, prompts, new_tokens):
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [r.token_ids for r in generate(model, prompts, params)]


def accuracy(args):
    from gptfast.training.data import load_dataset
    from gptfast.tokenizer import load_tokenizer
    from gptfast.training import evaluate

    run_dir = args.run_dir or os.path.join(cache_dir(), "bench_int8_tiny")
    fp32, tokenizer_path = trained_model(run_dir)
    int8 = quantize(copy.deepcopy(fp32), "int8")
    data = load_dataset(None, load_tokenizer(tokenizer_path), corpus_max_bytes=2_000_000, progress=False)
    ppl = {name: evaluate(m, data, batch_size=8, block_size=128).perplexity for name, m in (("fp32", fp32), ("int8", int8))}
    change = ppl["int8"] / ppl["fp32"] - 1
    print(f"validation perplexity: fp32 {ppl['fp32']:.4f}, int8 {ppl['int8']:.4f} ({change:+.3%}; target within 1%)")

    tokens = data.val.tokens
    step = (len(tokens) - PROMPT_LEN) // args.prompts
    prompts = [[int(t) for t in tokens[i * step: i * step + PROMPT_LEN]] for i in range(args.prompts)]
    a, b = greedy(fp32, prompts, args.new_tokens), greedy(int8, prompts, args.new_tokens)
    same = sum(x == y for x, y in zip(a, b))
    prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(a, b)]
    print(f"greedy agreement over {args.new_tokens} tokens: {same}/{len(prompts)} prompts identical "
          f"({same / len(prompts):.0%}); mean agreeing prefix {sum(prefix) / len(prefix):.1f} tokens")


def read_bandwidth(nbytes=2**30, repeats=5):
    """Bytes/s of the best of ``repeats`` sums over a float32 buffer of ``nbytes`` (all torch threads)."""
    buf = torch.ones(int(nbytes) // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / min(times)


def weight_bytes(model):
    """Bytes of the linear-layer weights one decode step reads (int8 layers: their int8
    weights; float layers: the LM head is the tied embedding, counted once)."""
    from gptfast.quantization import Int8Linear

    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if int8:
        return sum(m.weight_int8.numel() for m in int8)
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def decode_seconds(run, new_tokens):
    """Seconds of (new_tokens - 1) decode steps: time(prompt + new_tokens) - time(prompt + 1)."""
    start = time.perf_counter()
    run(new_tokens)
    full = time.perf_counter() - start
    start = time.perf_counter()
    run(1)
    return full - (time.perf_counter() - start)


def speed(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2")
    fp32 = GPT(config, backend="torch").eval()
    int8 = quantize(copy.deepcopy(fp32), "int8")
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                           n_layer=config.n_layer, n_head=config.n_head)
    hf = GPT2LMHeadModel(hf_config).eval()
    bandwidth = read_bandwidth()
    sizes = {"gptfast fp32": weight_bytes(fp32), "gptfast int8": weight_bytes(int8)}
    own = {name: read_bandwidth(size) for name, size in sizes.items()}
    # tokens/s per row that reading the weights once per step at each rate allows
    limits = {name: (bandwidth / size, own[name] / size) for name, size in sizes.items()}
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s over 1 GiB; over the weights' own size: "
          + ", ".join(f"{name.split()[1]} ({sizes[name] / 1e6:.0f} MB) {own[name] / 1e9:.1f} GB/s" for name in sizes)
          + f"; GPT-2 124M shapes, random weights, greedy, prompt {PROMPT_LEN}, "
          f"{args.new_tokens} new tokens, {args.runs} runs (engines interleaved within each run)")
    print(f"{'batch':>5} | {'engine':<16} | {'tok/s min':>9} {'median':>8} {'max':>8} | {'ms/step':>7} | "
          f"{'% of read limit (1 GiB / own size)':>34} | load avg")
    for batch in args.batches:
        prompts = [[int(t) for t in torch.randint(0, config.vocab_size, (PROMPT_LEN,))] for _ in range(batch)]
        ids = torch.tensor(prompts)

        def gptfast_run(model):
            params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
            return lambda n: generate(model, prompts, dataclasses.replace(params, max_new_tokens=n))

        def hf_run(n):
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

        runs = {"gptfast fp32": gptfast_run(fp32), "gptfast int8": gptfast_run(int8), "HF generate fp32": hf_run}
        for run in runs.values():
            run(2)  # warm-up: extension, packing, allocator
        rates = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, run in runs.items():
                rates[name].append(batch * (args.new_tokens - 1) / decode_seconds(run, args.new_tokens))
        load = os.getloadavg()[0]
        for name, r in rates.items():
            r = sorted(r)
            median = statistics.median(r)
            if name in limits and batch == 1:
                limit = " / ".join(f"{100 * median / batch / rate:.0f}%" for rate in limits[name])
            else:
                limit = ""
            limit = f"{limit:>34}"
            print(f"{batch:>5} | {name:<16} | {r[0]:9.1f} {median:8.1f} {r[-1]:8.1f} | {1000 * batch / median:7.1f} | "
                  f"{limit} | {load:.2f}")
        med = {name: statistics.median(r) for name, r in rates.items()}
        print(f"{'':>5}   int8 / fp32 {med['gptfast int8'] / med['gptfast fp32']:.2f}x, "
              f"int8 / HF {med['gptfast int8'] / med['HF generate fp32']:.2f}x, "
              f"fp32 / HF {med['gptfast fp32'] / med['HF generate fp32']:.2f}x (medians)", flush=True)
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > cores:
        print(f"warning: load average {os.getloadavg()[0]:.1f} exceeds the {cores} cores: the figures are not an idle "
              f"machine's")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="training run directory (default: <gptfast cache>/bench_int8_tiny)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per engine and batch (min / median / max)")
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8, 64],
                        help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--skip", choices=["accuracy", "speed"], help="leave one half out")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1 or min(args.batches) < 1:
        parser.error(f"--new-tokens must be >= 2, --runs and --batches >= 1 (got {args.new_tokens}, {args.runs}, "
                     f"{args.batches})")
    import transformers

    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}")
    if args.skip != "accuracy":
        accuracy(args)
    if args.skip != "speed":
        speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
