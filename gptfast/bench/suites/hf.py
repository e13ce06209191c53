"""Hugging Face transformers benchmark (issue 13): GPT-2 124M (random weights, bf16) with
``attn_implementation`` ``eager``, ``sdpa`` and ``gptfast`` (``apply_gptfast``: gptfast's
attention and LayerNorm kernels).

- ``fwd+bwd``: forward, loss and backward of batch 8 x 1024 tokens; tokens/s.
- ``generate``: HF ``generate`` (greedy, DynamicCache), batch 8, a 128-token prompt and
  128 new tokens (no early stop); tokens counted: the new tokens of all rows.

CUDA only: on a CPU every row is listed as skipped (the Triton interpreter's speed means
nothing, and GPT-2 124M in fp32 on a CPU is not what this compares).
"""
from functools import partial
from typing import List, Tuple

import torch

from gptfast.bench.results import Skipped
from gptfast.bench.runner import CORE, Case
from gptfast.bench.suites.common import is_gpu, require_fused, require_module

PROVIDERS = ("eager", "sdpa", "gptfast")
TRAIN_BATCH, TRAIN_LEN = 8, 1024
GEN_BATCH, PROMPT_LEN, NEW_TOKENS = 8, 128, 128
TIMING = dict(warmup=1, min_reps=3, max_reps=10, target_ms=1000.0)
QUICK_TIMING = dict(warmup=1, min_reps=2, max_reps=5, target_ms=400.0)  # a GPU suite stage of ~30 s

_models = {}


def _model(provider, device):
    """One randomly initialised GPT-2 124M per provider (bf16, no dropout), using ``provider``."""
    if provider not in _models:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = GPT2LMHeadModel(config).to(device=device, dtype=torch.bfloat16)
        if provider == "gptfast":
            from gptfast.integrations.hf import apply_gptfast

            apply_gptfast(model)
        else:
            model.set_attn_implementation(provider)
        _models[provider] = model
    return _models[provider]


def _require(provider, device):
    require_module("transformers")
    if provider == "gptfast":
        require_fused(device)


def _build_train(provider, device):
    _require(provider, device)
    model = _model(provider, device).train()
    sets = [torch.randint(0, model.config.vocab_size, (TRAIN_BATCH, TRAIN_LEN), device=device) for _ in range(2)]

    def run(ids):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
    return run, sets


def _build_generate(provider, device):
    _require(provider, device)
    model = _model(provider, device).eval()
    sets = [torch.randint(0, model.config.vocab_size, (GEN_BATCH, PROMPT_LEN), device=device) for _ in range(2)]

    def run(ids):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  pad_token_id=model.config.eos_token_id)
    return run, sets


_MODES = {
    "fwd+bwd": (_build_train, f"B={TRAIN_BATCH},T={TRAIN_LEN}", TRAIN_BATCH * TRAIN_LEN),
    "generate": (_build_generate, f"B={GEN_BATCH},prompt={PROMPT_LEN},new={NEW_TOKENS}", GEN_BATCH * NEW_TOKENS),
}


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    out, skipped = [], []
    for mode, (build, shape, tokens) in _MODES.items():
        for provider in PROVIDERS:
            if not is_gpu(device):
                skipped.append(Skipped("hf_gpt2", provider, mode, shape, "GPU only: HF GPT-2 124M in bf16"))
                continue
            out.append(Case(op="hf_gpt2", provider=provider, mode=mode, shape=shape, dtype="bfloat16",
                            build=partial(build, provider, device), group=f"hf_gpt2 {mode} gpt2-124M bfloat16",
                            tokens=tokens, priority=CORE, **(QUICK_TIMING if quick else TIMING)))
    return out, skipped
