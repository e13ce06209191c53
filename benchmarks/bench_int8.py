"""Weight-only int8 (issue 14): accuracy on a trained model and CPU decode speed.

Accuracy: trains the ``tiny`` preset with ``gptfast.training.train`` on the embedded
standard-library corpus (or reuses the run directory), then reports the validation
perplexity of the fp32 model and of its int8 copy (``gptfast.quantize``), and over
``--prompts`` prompts cut from the validation split the fraction whose 64 greedy tokens
agree exactly (and the mean length of the agreeing prefix).

Speed: GPT-2 124M shapes with random weights, batch 1, greedy, on the CPU: decode
tokens/s of the int8 model, of gptfast's fp32 model (``gptfast.generate``, prepacked
fp32 weights) and of Hugging Face ``generate`` on a ``GPT2LMHeadModel`` built from the
same config (no download). Decode time = time(prompt + N new tokens) - time(prompt + 1
new token), best of ``--repeats`` runs, so prefill is left out.

    PYTHONPATH=$PWD python benchmarks/bench_int8.py [--run-dir DIR] [--new-tokens 64]
"""
import argparse
import copy
import os
import platform
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


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(run, new_tokens, repeats):
    """Tokens/s of decode: (new_tokens - 1) / (time of new_tokens - time of 1 new token)."""
    run(2)  # warm-up (extension, packing, allocator)
    full, one = best_time(lambda: run(new_tokens), repeats), best_time(lambda: run(1), repeats)
    return (new_tokens - 1) / (full - one)


def speed(args):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2")
    prompt = [[int(t) for t in torch.randint(0, config.vocab_size, (PROMPT_LEN,))]]
    fp32 = GPT(config, backend="torch").eval()
    rates = {}

    def gptfast_run(model):
        return lambda n: generate(model, prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))

    rates["gptfast fp32"] = decode_rate(gptfast_run(fp32), args.new_tokens, args.repeats)
    int8 = quantize(copy.deepcopy(fp32), "int8")
    rates["gptfast int8"] = decode_rate(gptfast_run(int8), args.new_tokens, args.repeats)
    del int8

    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                           n_layer=config.n_layer, n_head=config.n_head)
    hf = GPT2LMHeadModel(hf_config).eval()
    ids = torch.tensor(prompt)

    def hf_run(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    rates["HF generate fp32"] = decode_rate(hf_run, args.new_tokens, args.repeats)

    for name, rate in rates.items():
        print(f"{name:<18} {rate:7.1f} tokens/s  ({1000 / rate:6.1f} ms/token)")
    print(f"int8 / gptfast fp32: {rates['gptfast int8'] / rates['gptfast fp32']:.2f}x (target >= 2x); "
          f"int8 / HF generate: {rates['gptfast int8'] / rates['HF generate fp32']:.2f}x (target >= 2.5x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="training run directory (default: <gptfast cache>/bench_int8_tiny)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=["accuracy", "speed"], help="leave one half out")
    args = parser.parse_args(argv)
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
