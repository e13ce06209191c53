"""End-to-end benchmark: prefill and decode tokens/s, training step tokens/s and MFU.

On a GPU: GPT-2 124M with random weights, bf16.
  - prefill: batch {1, 8} x 1024 tokens into the static KV cache; the fused backend
    against the torch backend (SDPA + F.layer_norm), the reference and HF transformers.
  - decode: batch {1, 8, 64} ({1, 8} with quick), a 16-token prompt and 256 new tokens, greedy, no early
    stop: ``gptfast.generate`` (C++ loop, CUDA graph) against the same call with the
    Python twin loop (``engine="python"``), a static-cache decode under
    ``torch.compile(mode="reduce-overhead")`` and HF ``generate``, all on the same
    weights. Tokens counted: the new tokens of all rows.
  - training step (forward with the loss, backward, fused AdamW step): T = 1024, batch 8,
    fp32 weights with bf16 autocast, the loss through ``linear_cross_entropy`` (no logits
    held). Four rows in one run: the torch backend eager (``torch``) and compiled
    (``torch.compile``), the fused backend eager (``gptfast``) and compiled
    (``gptfast+compile``); compiled = the whole forward under
    ``torch.compile(fullgraph=True)`` with inductor, as ``gptfast train --compile``
    (its compile happens in the warm-up calls; ``gptfast.bench.warm --compile`` fills
    inductor's cache first). On CUDA each row carries its peak memory. MFU = model FLOPs / time / measured bf16 matmul peak, with
    ``6*N + 12*L*C*T`` FLOPs per token (N without position embeddings; the PaLM
    convention, as ``gptfast train`` and llm.c count it).
On the CPU the same comparisons run on a 4-layer x 256-wide byte-level model (wall
clock, shorter runs); the GPT-2 124M rows and the CUDA-graph providers are listed as skipped.
"""
import tempfile
from functools import partial
from typing import List, Tuple

import torch

from gptfast.bench.results import PEAK_MATMUL, Skipped
from gptfast.bench.runner import CORE, EXTRA, SLOW, Case, SkipCase
from gptfast.bench.suites.common import FUSED_GPU_ONLY, is_gpu, require_fused, require_gpu, require_module

PROMPT_LEN = 16
CPU_MODEL = dict(vocab_size=256, block_size=512, n_layer=4, n_head=4, n_embd=256)
E2E_TIMING = dict(warmup=1, min_reps=3, max_reps=10, target_ms=1000.0)
TRAIN_TIMING = dict(min_reps=3, max_reps=6, target_ms=400.0)  # a step is tens of ms: a few tell

_models = {}


def model_config(device):
    from gptfast.config import GPTConfig

    return GPTConfig.from_preset("gpt2") if is_gpu(device) else GPTConfig(**CPU_MODEL)


def model_name(device) -> str:
    return "gpt2-124M" if is_gpu(device) else "4x256"


def shared_model(device, dtype):
    """One randomly initialised model per (device, dtype), reused by the cases (eval mode)."""
    key = (str(device), dtype)
    if key not in _models:
        from gptfast.model import GPT

        torch.manual_seed(0)
        _models[key] = GPT(model_config(device), backend="torch").to(device=device, dtype=dtype).eval()
    return _models[key]


def quantized_model(device, dtype):
    """The shared model with weight-only int8 linear layers (gptfast.quantize), built once."""
    key = (str(device), dtype, "int8")
    if key not in _models:
        import copy

        from gptfast.quantization import quantize

        _models[key] = quantize(copy.deepcopy(shared_model(device, dtype)), "int8")
    return _models[key]


def _backend_for(provider, device, decode: bool = False) -> str:
    """The model backend a provider runs. ``gptfast`` means the fused backend, which is the
    point of its prefill and training rows and needs CUDA; its decode rows are about the
    C++ loop, so on the CPU they run the torch backend."""
    if provider in ("gptfast", "gptfast-int8", "python-twin"):
        if is_gpu(device):
            require_fused(device)
            return "fused"
        if not decode:
            raise SkipCase(FUSED_GPU_ONLY)
        return "torch"
    return {"torch": "torch", "reference": "reference", "torch.compile": "torch"}[provider]


def _hf_model(model, device, dtype):
    """HF GPT2LMHeadModel with the same weights (through save_pretrained, as users do)."""
    require_module("transformers")
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp)
    return hf.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------


def _build_prefill(provider, batch, seq_len, dtype, device):
    model = shared_model(device, dtype)
    vocab = model.config.vocab_size
    sets = [torch.randint(0, vocab, (batch, seq_len), device=device) for _ in range(2)]
    positions = torch.arange(seq_len, device=device)
    if provider == "hf":
        hf = _hf_model(model, device, dtype)

        def run(idx):
            with torch.no_grad():
                return hf(idx, use_cache=True).logits

        return run, sets
    model.set_backend(_backend_for(provider, device))
    model.setup_cache(batch, seq_len)

    def run(idx):
        with torch.no_grad():
            return model(idx, input_pos=positions)

    return run, sets


# ---------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------


def _prompts(batch, vocab, device):
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g).to(device)


def _build_decode(provider, batch, new_tokens, dtype, device):
    model = quantized_model(device, dtype) if provider == "gptfast-int8" else shared_model(device, dtype)
    prompts = _prompts(batch, model.config.vocab_size, device)
    if provider in ("gptfast", "gptfast-int8", "python-twin"):
        import gptfast

        model.set_backend(_backend_for(provider, device, decode=True))
        params = gptfast.SamplingParams(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        prompt_lists = prompts.tolist()
        engine = "python" if provider == "python-twin" else "cpp"
        if engine == "cpp":
            from gptfast.runtime.extension import extension_status, load_extension

            if load_extension() is None:
                raise SkipCase(f"C++ sampling extension unavailable: {extension_status()}")
        return (lambda _: gptfast.generate(model, prompt_lists, params, engine=engine)), [None]
    if provider == "hf":
        hf = _hf_model(model, device, dtype)
        mask = torch.ones_like(prompts)

        def run(_):
            with torch.no_grad():
                return hf.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)

        return run, [None]
    if provider == "torch.compile":
        require_gpu(device, "GPU only: mode='reduce-overhead' replays CUDA graphs")
        return _compiled_decode(model, prompts, new_tokens), [None]
    raise ValueError(f"unknown decode provider {provider!r}")


def _compiled_decode(model, prompts, new_tokens):
    """Static-cache greedy decode with the decode step under torch.compile(mode="reduce-overhead")."""
    batch = prompts.shape[0]
    device = prompts.device
    model.set_backend("torch")
    model.setup_cache(batch, PROMPT_LEN + new_tokens)
    torch._dynamo.reset()

    def step(token, pos):
        return model(token, input_pos=pos)[:, -1].argmax(dim=-1, keepdim=True)

    compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    prompt_pos = torch.arange(PROMPT_LEN, device=device)
    positions = [torch.full((batch, 1), PROMPT_LEN + i, device=device, dtype=torch.long) for i in range(new_tokens)]

    def run(_):
        with torch.no_grad():
            token = model(prompts, input_pos=prompt_pos)[:, -1].argmax(dim=-1, keepdim=True)
            out = [token]
            for i in range(new_tokens - 1):
                torch.compiler.cudagraph_mark_step_begin()
                token = compiled_step(token, positions[i]).clone()
                out.append(token)
            return torch.cat(out, dim=1)

    return run


# ---------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------


def count_params(config) -> int:
    """Parameters of ``GPT(config)`` without the position embedding (what ``num_params()`` counts),
    computed from the config so that no 124M model is built just to count it."""
    c, bias = config.n_embd, int(config.bias)
    hidden = config.mlp_hidden
    norm = c + c * bias
    block = 2 * norm + (3 * c * c + 3 * c * bias) + (c * c + c * bias) + (c * hidden + hidden * bias) + (hidden * c + c * bias)
    return config.vocab_size * c + config.n_layer * block + norm


def train_flops_per_token(config, n_params: int, seq_len: int) -> float:
    """``6*N + 12*L*C*T``: the PaLM convention that ``gptfast train`` (gptfast.training.mfu) and llm.c use."""
    from gptfast.training.mfu import flops_per_token

    return flops_per_token(n_params, config.n_layer, config.n_embd, seq_len)


# The training-step providers: (model backend, compiled?). ``gptfast`` is the fused
# backend (GPU only); the ``+compile`` / ``torch.compile`` rows compile the whole step's
# forward (loss included) with fullgraph=True, as ``gptfast train --compile`` does.
TRAIN_PROVIDERS = {"torch": ("torch", False), "torch.compile": ("torch", True),
                   "gptfast": ("fused", False), "gptfast+compile": ("fused", True)}


def compile_backend(device) -> str:
    """inductor on the GPU; aot_eager on the CPU, where the rows are dry runs (no C++ build)."""
    return "inductor" if is_gpu(device) else "aot_eager"


def _build_train(provider, batch, seq_len, device):
    """One training step: forward with the loss (``return_logits=False``: the backend's
    ``linear_cross_entropy``, which in the fused backend never holds all the logits),
    backward, AdamW (fused on CUDA), as ``gptfast train`` runs it."""
    from gptfast.model import GPT

    backend, compiled = TRAIN_PROVIDERS[provider]
    if backend == "fused":
        if not is_gpu(device):
            raise SkipCase(FUSED_GPU_ONLY)
        require_fused(device)
    torch.manual_seed(0)
    model = GPT(model_config(device), backend=backend).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if is_gpu(device) else None)

    def loss_of(idx, targets):
        return model(idx, targets, return_logits=False)[1]

    if compiled:
        torch._dynamo.reset()
        loss_of = torch.compile(loss_of, fullgraph=True, dynamic=False, backend=compile_backend(device))
    vocab = model.config.vocab_size
    sets = [(torch.randint(0, vocab, (batch, seq_len), device=device),
             torch.randint(0, vocab, (batch, seq_len), device=device)) for _ in range(2)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_gpu(device) else torch.autocast("cpu", enabled=False)

    def run(data):
        idx, targets = data
        with autocast:
            loss = loss_of(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return run, sets


# ---------------------------------------------------------------------------------
# the case list
# ---------------------------------------------------------------------------------


def cases(device, quick: bool = False) -> Tuple[List[Case], List[Skipped]]:
    gpu = is_gpu(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    dname = "bfloat16" if gpu else "float32"
    name = model_name(device)
    config = model_config(device)
    out: List[Case] = []
    skipped: List[Skipped] = []

    # prefill
    prefill_len = 1024 if gpu else 128
    for batch in (1, 8) if gpu or not quick else (1,):
        for provider, priority in (("gptfast", CORE), ("torch", CORE), ("reference", EXTRA), ("hf", EXTRA)):
            out.append(Case(
                op="prefill", provider=provider, mode="e2e", shape=f"{name} B={batch} T={prefill_len}", dtype=dname,
                build=partial(_build_prefill, provider, batch, prefill_len, dtype, device),
                group=f"prefill {name} T={prefill_len} {dname}", size=batch, size_name="batch",
                tokens=batch * prefill_len, priority=priority, **E2E_TIMING,
            ))

    # decode
    new_tokens = 256 if gpu else (16 if quick else 32)  # 256: the length issue 5's targets are set for
    batches = ((1, 8) if quick else (1, 8, 64)) if gpu else ((1,) if quick else (1, 8))
    for batch in batches:
        providers = (("gptfast", CORE), ("gptfast-int8", CORE if batch == 1 else EXTRA),
                     ("torch.compile", EXTRA if batch == 1 else SLOW),
                     ("hf", EXTRA if batch == 1 else SLOW), ("python-twin", EXTRA if batch == 1 else SLOW))
        for provider, priority in providers:
            if provider == "torch.compile" and not gpu:
                skipped.append(Skipped("decode", provider, "e2e", f"{name} B={batch}",
                                       "GPU only: mode='reduce-overhead' replays CUDA graphs"))
                continue
            out.append(Case(
                op="decode", provider=provider, mode="e2e", shape=f"{name} B={batch} new={new_tokens}", dtype=dname,
                build=partial(_build_decode, provider, batch, new_tokens, dtype, device),
                group=f"decode {name} {new_tokens} new tokens {dname}", size=batch, size_name="batch",
                tokens=batch * new_tokens, priority=priority, **E2E_TIMING,
            ))
    if not gpu:
        skipped.append(Skipped("decode", "*", "e2e", "gpt2-124M B=1,8,64 new=256", "GPU only: GPT-2 124M bf16 decode"))

    # training step
    n_params = count_params(config)
    batch, seq_len = (8, 1024) if gpu else (4, 128)
    flops = train_flops_per_token(config, n_params, seq_len) * batch * seq_len
    train_providers = (("gptfast", CORE), ("gptfast+compile", CORE), ("torch", CORE), ("torch.compile", CORE))
    for provider, priority in train_providers:
        if provider.startswith("gptfast") and not gpu:
            skipped.append(Skipped("train_step", provider, "fwd+bwd", f"{name} B={batch} T={seq_len}", FUSED_GPU_ONLY))
            continue
        compiled = TRAIN_PROVIDERS[provider][1]
        out.append(Case(
            op="train_step", provider=provider, mode="fwd+bwd", shape=f"{name} B={batch} T={seq_len}",
            dtype="bf16-autocast" if gpu else dname,
            build=partial(_build_train, provider, batch, seq_len, device),
            group="", tokens=batch * seq_len, flops=flops, peak=PEAK_MATMUL, priority=priority,
            note=f"whole model, fullgraph, {compile_backend(device)}" if compiled else "",
            **{**TRAIN_TIMING, "warmup": 3 if compiled else 2},
        ))
    if not gpu:
        skipped.append(Skipped("train_step", "*", "fwd+bwd", "gpt2-124M B=8 T=1024",
                               "GPU only: GPT-2 124M bf16 training step and MFU"))
    return out, skipped
