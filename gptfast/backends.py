"""The op backend switch: which implementation of layernorm and attention a model uses.

- ``reference``: gptfast.reference, the explicit pure-PyTorch twins (the judges).
- ``torch``: what a PyTorch user writes: ``F.layer_norm`` and ``F.scaled_dot_product_attention``.
- ``fused``: gptfast.ops, the Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

Choose per model (``GPT(config, backend=...)``, ``model.set_backend``) or through the
``GPTFAST_BACKEND`` environment variable; the default is ``fused`` on CUDA and ``torch``
on CPU.
"""
import functools
import os

import torch
import torch.nn.functional as F

from gptfast import reference

BACKENDS = ("reference", "torch", "fused")
ENV_VAR = "GPTFAST_BACKEND"


def resolve_backend(name=None) -> str:
    """The backend to use: ``name``, else $GPTFAST_BACKEND, else the device default."""
    name = name or os.environ.get(ENV_VAR) or ("fused" if torch.cuda.is_available() else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


class TorchOps:
    """SDPA + F.layer_norm."""

    name = "torch"

    @staticmethod
    def layer_norm(x, weight, bias, eps, residual=None):
        if residual is None:
            return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        h = x + residual
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h

    @staticmethod
    def causal_attention(q, k, v, q_offset=0):
        if q_offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        tq, tk = q.shape[-2], k.shape[-2]
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    @staticmethod
    def decode_attention(q, k_cache, v_cache, cache_lens):
        positions = torch.arange(k_cache.shape[-2], device=q.device)
        visible = (positions[None, :] < cache_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=visible)
        return out.squeeze(2)

    @staticmethod
    def gelu(x):
        return F.gelu(x, approximate="tanh")


class ReferenceOps:
    """Explicit scores, masks and softmax; layernorm statistics spelled out."""

    name = "reference"

    @staticmethod
    def layer_norm(x, weight, bias, eps, residual=None):
        return reference.layer_norm(x, weight, bias, eps, residual=residual)

    @staticmethod
    def causal_attention(q, k, v, q_offset=0):
        return reference.causal_attention(q, k, v, q_offset=q_offset)

    @staticmethod
    def decode_attention(q, k_cache, v_cache, cache_lens):
        return reference.decode_attention(q, k_cache, v_cache, cache_lens)

    @staticmethod
    def gelu(x):
        return reference.gelu(x)


@functools.lru_cache(maxsize=None)
def _fused_ops():
    """gptfast.ops: Triton layernorm and attention kernels. Imported on first use of the
    backend, so that choosing another backend never imports them."""
    from gptfast.ops.causal_attention import causal_attention
    from gptfast.ops.decode_attention import decode_attention
    from gptfast.ops.layer_norm import layer_norm

    class FusedOps:
        name = "fused"

        @staticmethod
        def layer_norm(x, weight, bias, eps, residual=None):
            return layer_norm(x, weight, bias, eps, residual=residual)

        @staticmethod
        def causal_attention(q, k, v, q_offset=0):
            return causal_attention(q, k, v, q_offset=q_offset)

        @staticmethod
        def decode_attention(q, k_cache, v_cache, cache_lens):
            return decode_attention(q, k_cache, v_cache, cache_lens)

        gelu = TorchOps.gelu

    return FusedOps


def get_ops(name=None):
    name = resolve_backend(name)
    if name == "fused":
        return _fused_ops()
    return {"reference": ReferenceOps, "torch": TorchOps}[name]
