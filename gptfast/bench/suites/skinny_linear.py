"""Skinny-matmul benchmark (issue 21): a GPT-2 124M decode step's five linear layers, each
with the neighbours a decode step fuses into it, against what runs them today.

Per layer (weight (N, K)): ``qkv`` layer norm + c_attn (2304, 768) + the KV-cache write
(a (B, 12, 1024, 64) cache); ``attn_proj`` c_proj (768, 768) + residual; ``fc`` layer norm
+ c_fc (3072, 768) + GELU; ``mlp_proj`` c_proj (768, 3072) + residual; ``lm_head`` final
layer norm + (50257, 768). Rows 1, 4 (a speculative verify step) and 16. Providers:
``gptfast`` (``gptfast.ops.skinny_linear`` / ``skinny_linear_kv``: one launch) and
``torch`` (the torch path: ``F.layer_norm``, cuBLAS ``F.linear``, GELU, add, and an
``index_put`` per cache: the kernels a decode step launches today), with bf16 weights and
with int8 weights (``torch`` then dequantises, as ``int8_linear``'s torch path). Bytes
counted: the weights read; fraction of peak against the measured copy bandwidth. Every
row runs in a CUDA graph on a GPU (launch overhead is what these fusions remove, and a
decode step replays a graph). The fused rows are GPU only; on a CPU the torch rows run
in float32.
"""
from functools import partial
from typing import List, Tuple

import torch

from gptfast.bench.results import PEAK_COPY
from gptfast.runtime.devices import dtype_name
from gptfast.bench.runner import CORE, Case
from gptfast.bench.suites.common import input_set_count, is_gpu, require_fused

# name: (N, K, layer norm, activation, residual, KV-cache write)
LAYERS = {"qkv": (2304, 768, True, None, False, True), "attn_proj": (768, 768, False, None, True, False),
          "fc": (3072, 768, True, "gelu", False, False), "mlp_proj": (768, 3072, False, None, True, False),
          "lm_head": (50257, 768, True, None, False, False)}
ROWS, QUICK_ROWS = (1, 4, 16), (1,)
QUICK_LAYERS = ("attn_proj", "fc")
HEADS, HEAD_DIM, CACHE_LEN = 12, 64, 1024
PROVIDERS = ("gptfast", "torch")


def _inputs(layer, rows, dtype, int8, device):
    n, k, ln, activation, residual, kv = LAYERS[layer]
    weight = torch.randn(n, k, device=device) * 0.02
    args = {"x": torch.randn(rows, k, device=device, dtype=dtype), "bias": torch.zeros(n, device=device, dtype=dtype)}
    if int8:
        from gptfast.ops.int8_linear import quantize_weight

        args["weight"], args["scale"] = quantize_weight(weight)
    else:
        args["weight"] = weight.to(dtype)
    if ln:
        args["ln_weight"] = torch.ones(k, device=device, dtype=dtype)
        args["ln_bias"] = torch.zeros(k, device=device, dtype=dtype)
    if residual:
        args["residual"] = torch.randn(rows, n, device=device, dtype=dtype)
    if kv:
        args["x"] = args["x"].view(rows, 1, k)
        shape = (rows, HEADS, CACHE_LEN, HEAD_DIM)
        args["k_cache"] = torch.zeros(shape, device=device, dtype=dtype)
        args["v_cache"] = torch.zeros(shape, device=device, dtype=dtype)
        args["positions"] = torch.full((rows, 1), CACHE_LEN // 2, device=device, dtype=torch.int64)
    return args, activation, kv


def _call(provider, layer, args, activation, kv):
    from gptfast.ops import skinny_linear as fused_module  # noqa: F401  (registers the ops)
    from gptfast.ops import torch_path
    from gptfast.ops.skinny_linear import skinny_linear, skinny_linear_kv

    params = {name: args[name] for name in ("scale", "ln_weight", "ln_bias") if name in args}
    if kv:
        fn = skinny_linear_kv if provider == "gptfast" else torch_path.skinny_linear_kv
        return fn(args["x"], args["weight"], args["bias"], args["k_cache"], args["v_cache"], args["positions"],
                  **params)
    fn = skinny_linear if provider == "gptfast" else torch_path.skinny_linear
    return fn(args["x"], args["weight"], args["bias"], activation=activation, residual=args.get("residual"),
              **params)


def _build(provider, layer, rows, dtype, int8, device):
    if provider == "gptfast":
        require_fused(device)
    n, k = LAYERS[layer][:2]
    weight_bytes = n * k * (1 if int8 else dtype.itemsize)
    sets = [_inputs(layer, rows, dtype, int8, device) for _ in range(input_set_count(weight_bytes, device, cap=8))]

    def run(inputs):
        args, activation, kv = inputs
        with torch.no_grad():
            return _call(provider, layer, args, activation, kv)
    return run, sets


def cases(device, quick: bool = False) -> Tuple[List[Case], list]:
    gpu = is_gpu(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    out = []
    for int8 in (False, True):
        if quick and int8:
            continue
        weights = f"int8/{dtype_name(dtype)}" if int8 else dtype_name(dtype)
        for rows in (QUICK_ROWS if quick else ROWS):
            for layer in (QUICK_LAYERS if quick else tuple(LAYERS)):
                n, k = LAYERS[layer][:2]
                for provider in PROVIDERS:
                    out.append(Case(
                        op="skinny_linear", provider=provider, mode="fwd", shape=f"{layer} {rows}x{k}->{n}",
                        dtype=weights, build=partial(_build, provider, layer, rows, dtype, int8, device),
                        group=f"skinny_linear {rows} rows {weights}", size=n * k, size_name="weights",
                        bytes=n * k * (1 if int8 else dtype.itemsize), peak=PEAK_COPY, priority=CORE,
                        cuda_graph=gpu,
                    ))
    return out, []
