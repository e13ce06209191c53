"""Public drop-in fused ops.

Each validates its inputs, dispatches (Triton on CUDA or under the interpreter,
otherwise the torch path) and is registered through ``torch.library.custom_op`` with
fake and autograd registrations, so ``torch.compile(fullgraph=True)`` and CUDA graph
capture see a single op. Submodules load on first use: importing ``gptfast.ops`` imports
neither triton nor any kernel.
"""
import importlib

_OPS = {
    "causal_attention": "gptfast.ops.causal_attention",
    "decode_attention": "gptfast.ops.decode_attention",
    "layer_norm": "gptfast.ops.layer_norm",
}


def __getattr__(name):
    if name in _OPS:
        fn = getattr(importlib.import_module(_OPS[name]), name)
        globals()[name] = fn  # later lookups skip __getattr__
        return fn
    raise AttributeError(f"module 'gptfast.ops' has no attribute {name!r}")


__all__ = list(_OPS)
