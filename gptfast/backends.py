"""The op backend switch: which implementation of layernorm, attention and GELU a model uses.

A backend is a module with the same four functions (``layer_norm``, ``causal_attention``,
``decode_attention``, ``gelu``):

- ``reference``: ``gptfast.reference``, the explicit pure-PyTorch twins (the judges).
- ``torch``: ``gptfast.ops.torch_path``, what a PyTorch user writes (``F.layer_norm``,
  ``F.scaled_dot_product_attention``); the same functions the fused ops fall back to.
- ``fused``: ``gptfast.ops``, the Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

Choose per model (``GPT(config, backend=...)``, ``model.set_backend``) or through the
``GPTFAST_BACKEND`` environment variable; the default is ``fused`` on CUDA and ``torch``
on CPU.
"""
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "torch", "fused")
MODULES = {"reference": "gptfast.reference", "torch": "gptfast.ops.torch_path", "fused": "gptfast.ops"}
ENV_VAR = "GPTFAST_BACKEND"


def resolve_backend(name=None) -> str:
    """The backend to use: ``name``, else $GPTFAST_BACKEND, else the device default."""
    name = name or os.environ.get(ENV_VAR) or ("fused" if torch.cuda.is_available() else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def backend_module(name=None) -> ModuleType:
    """The module of backend ``name`` (resolved as ``resolve_backend`` does)."""
    return importlib.import_module(MODULES[resolve_backend(name)])
