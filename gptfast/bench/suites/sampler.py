"""Sampler step benchmark (issue 5): one logits-processing + sampling step on (B, V) logits.

The C++ engine's ``sample_step`` against the Python twin's (``gptfast.generation.engines``),
for GPT-2's vocabulary (V = 50257) at batch 1 and 8, with two parameter sets: greedy,
and sampling with every processor on (repetition penalty, temperature, top-k, top-p,
min-p). A step advances the decode state in place, so each timed call first rewinds the
state's step counters (three tiny fills, the same for both providers). On CUDA a step is
a handful of small kernels: it is timed by CUDA-graph replay.
"""
from functools import partial
from typing import List, Tuple

import torch

from gptfast.bench.results import Skipped
from gptfast.bench.runner import CORE, Case, SkipCase

VOCAB = 50257
BATCHES = (1, 8)
PARAMETER_SETS = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1),
}
PROVIDERS = ("cpp", "python-twin")
MAX_NEW_TOKENS = 8


def _engine(provider):
    from gptfast.generation.engines import get_engine
    from gptfast.runtime.extension import extension_status, load_extension

    if provider == "python-twin":
        return get_engine("python")
    if load_extension() is None:
        raise SkipCase(f"C++ sampling extension unavailable: {extension_status()}")
    return get_engine("cpp")


def _build(provider, batch, parameter_set, device):
    from gptfast.generation.sampling_params import SamplingParams, build_sampling_tensors, new_decode_state

    engine = _engine(provider)
    params = [SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=row, **PARAMETER_SETS[parameter_set])
              for row in range(batch)]
    tensors = build_sampling_tensors(params, VOCAB, [p.seed for p in params], device, token_table=engine.token_table)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (batch, 16), generator=g).tolist()
    state = new_decode_state(prompts, params, tensors, VOCAB, device)
    sets = [torch.randn(batch, VOCAB, generator=g).to(device) for _ in range(4)]

    def run(logits):
        state.step.zero_()
        state.generated.zero_()
        state.finished.zero_()
        return engine.sample_step(logits, tensors, state)

    return run, sets


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    out = []
    batches = BATCHES[:1] if quick and not torch.device(device).type == "cuda" else BATCHES
    for parameter_set in PARAMETER_SETS:
        for batch in batches:
            for provider in PROVIDERS:
                out.append(Case(
                    op="sampler_step", provider=provider, mode="step", shape=f"B={batch},V={VOCAB},{parameter_set}",
                    dtype="float32", build=partial(_build, provider, batch, parameter_set, device),
                    group="", tokens=batch, priority=CORE, cuda_graph=True,
                ))
    return out, []
