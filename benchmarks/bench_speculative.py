"""Speculative decoding (issue 15) on the CPU: acceptance rate per k, tokens/s against plain
decode, and against Hugging Face assisted generation on the same two models.

Models: a target (the ``tiny`` training preset widened to 6 x 256, 1100 steps) and a draft
(1 x 128, 1000 steps), both trained by ``gptfast.training.train`` on the embedded
standard-library corpus (byte level) and cached in run directories (reused when present),
so one command reproduces everything. The target must be the better model (their
validation perplexities, on every window of the same validation split, are printed) and
several times more expensive per token than the draft: speculation only pays then.
Prompts: ``--prompts`` windows of 16 validation bytes. Greedy, batch 1, ``--new-tokens``
tokens per prompt (``ignore_eos``): speculative output equals plain output (checked here,
per prompt), so only the time differs.

Timing: each configuration generates every prompt once (after one warm-up prompt), and
tokens/s is all new tokens over the total time; prefill is included in all of them alike.
HF assisted generation: ``GPT2LMHeadModel.generate(assistant_model=..., do_sample=False,
num_assistant_tokens=k, num_assistant_tokens_schedule="constant")`` on the two models
exported with ``save_pretrained``, and plain HF greedy ``generate``.

    PYTHONPATH=$PWD python benchmarks/bench_speculative.py [--new-tokens 64] [--prompts 4] [--k 1 2 4 6]
"""
import argparse
import os
import platform
import sys
import time

import torch

from gptfast.training.evaluation import evaluate
from gptfast.generation.generate import generate
from gptfast.runtime.paths import cache_dir
from gptfast.generation.sampling_params import SamplingParams

PROMPT_LEN = 16
CORPUS_BYTES = 2_000_000  # the tiny preset's corpus: prompts and perplexities come from its validation split
_QUIET = dict(eval_interval=0, ckpt_interval=0, sample_prompts=[], progress=False)
TARGET = dict(n_layer=6, n_head=4, n_embd=256, max_steps=1100, **_QUIET)
DRAFT = dict(n_layer=1, n_head=2, n_embd=128, max_steps=1000, **_QUIET)


def trained(name, overrides, threads: int = 1):
    """The model trained into cache_dir()/name (trained there first if absent, on
    ``threads`` torch threads: on the shared 2-core VM a second thread mostly waits for a
    core another job holds)."""
    from gptfast.checkpoints.training_state import checkpoint_path
    from gptfast.checkpoints.loader import load_model_and_tokenizer
    from gptfast.training import TrainConfig, train

    run_dir = os.path.join(cache_dir(), name)
    if not checkpoint_path(run_dir).exists():
        print(f"training {name} into {run_dir} on {threads} thread(s) ...", flush=True)
        start, before = time.perf_counter(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            train(TrainConfig.from_preset("tiny", out_dir=run_dir, **overrides))
        finally:
            torch.set_num_threads(before)
        print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    loaded = load_model_and_tokenizer(run_dir, backend="torch")
    model, tokenizer_path = loaded.model, loaded.tokenizer_path
    hf_dir = os.path.join(run_dir, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        model.save_pretrained(hf_dir)
    return model.eval(), tokenizer_path, hf_dir


def validation_data(tokenizer_path):
    """The training corpus's train/validation splits (gptfast.training.data.Dataset)."""
    from gptfast.training.data import load_dataset
    from gptfast.tokenizer import load_tokenizer

    return load_dataset(None, load_tokenizer(tokenizer_path), corpus_max_bytes=CORPUS_BYTES, progress=False)


def prompts_from_validation(data, n):
    tokens = data.val.tokens
    step = (len(tokens) - PROMPT_LEN) // (n + 1)
    return [[int(t) for t in tokens[i * step:i * step + PROMPT_LEN]] for i in range(n + 1)]


def timed(fn, prompts):
    """(outputs, tokens/s) of fn(prompt) over prompts[1:], after a warm-up on prompts[0]."""
    fn(prompts[0])
    start = time.perf_counter()
    outs = [fn(p) for p in prompts[1:]]
    elapsed = time.perf_counter() - start
    return outs, sum(len(o) for o in outs) / elapsed


def gptfast_rows(target, draft, prompts, args):
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    stats = {}

    def plain(prompt):
        return generate(target, [prompt], params)[0].token_ids

    reference, rate = timed(plain, prompts)
    rows = [("gptfast plain decode", None, None, rate)]
    for k in args.k:
        def spec(prompt, k=k):
            r = generate(target, [prompt], params, draft_model=draft, num_draft_tokens=k)[0]
            stats.setdefault(k, []).append((r.accepted_draft_tokens, r.draft_tokens))
            return r.token_ids

        outs, rate = timed(spec, prompts)
        if outs != reference:
            raise SystemExit(f"k={k}: speculative greedy output differs from plain greedy output")
        accepted = sum(a for a, _ in stats[k][1:]) / sum(d for _, d in stats[k][1:])
        rows.append((f"gptfast speculative, k={k}", k, accepted, rate))
    return rows, reference


def hf_rows(target_dir, draft_dir, prompts, reference, args):
    from transformers import GPT2LMHeadModel

    target = GPT2LMHeadModel.from_pretrained(target_dir).eval()
    draft = GPT2LMHeadModel.from_pretrained(draft_dir).eval()
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def run(prompt, **kw):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), **common, **kw)
        return out[0, len(prompt):].tolist()

    outs, rate = timed(run, prompts)
    rows = [("HF generate (greedy)", None, None, rate, sum(o == r for o, r in zip(outs, reference)))]
    for k in args.k:
        outs, rate = timed(lambda p, k=k: run(p, assistant_model=draft, num_assistant_tokens=k,
                                                num_assistant_tokens_schedule="constant"), prompts)
        rows.append((f"HF assisted generation, k={k}", k, None, rate, sum(o == r for o, r in zip(outs, reference))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 6])
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face assisted generation")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads while training the models")
    args = ap.parse_args(argv)
    import transformers

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")
    target, tokenizer_path, target_hf = trained("bench_speculative_v2_target", TARGET, args.train_threads)
    draft, _, draft_hf = trained("bench_speculative_v2_draft", DRAFT, args.train_threads)
    data = validation_data(tokenizer_path)
    for name, model in (("target", target), ("draft", draft)):
        with torch.no_grad():
            scored = evaluate(model, data, block_size=128)
        print(f"{name} {model.num_params() / 1e6:.2f}M parameters ({model.config.n_layer} x {model.config.n_embd}): "
              f"validation perplexity {scored.perplexity:.2f} ({scored.tokens} tokens)")
    prompts = prompts_from_validation(data, args.prompts)
    rows, reference = gptfast_rows(target, draft, prompts, args)
    plain_rate = rows[0][3]
    print(f"\n{args.prompts} prompts x {args.new_tokens} greedy tokens, batch 1 (speculative output == plain: checked)")
    print("| engine | k | draft tokens accepted | tokens/s | vs gptfast plain |")
    print("|---|---|---|---|---|")
    for name, k, accepted, rate in rows:
        acc = f"{accepted:.1%}" if accepted is not None else ""
        print(f"| {name} | {k or ''} | {acc} | {rate:.1f} | {rate / plain_rate:.2f}x |")
    if not args.no_hf:
        for name, k, _, rate, same in hf_rows(target_hf, draft_hf, prompts, reference, args):
            print(f"| {name} | {k or ''} | | {rate:.1f} | {rate / plain_rate:.2f}x |  (same tokens as gptfast on "
                  f"{same}/{args.prompts} prompts)")


if __name__ == "__main__":
    main()
