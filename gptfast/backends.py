"""The op backend switch: which implementation of layernorm, attention and GELU a model uses.

A backend is a module with the same four functions (``layer_norm``, ``causal_attention``,
``decode_attention``, ``gelu``):

- ``reference``: ``gptfast.reference``, the explicit pure-PyTorch twins (the judges).
- ``torch``: ``gptfast.ops.torch_path``, what a PyTorch user writes (``F.layer_norm``,
  ``F.scaled_dot_product_attention``); the same functions the fused ops fall back to.
- ``fused``: ``gptfast.ops``, the Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

Choose per model (``GPT(config, backend=...)``, ``model.set_backend``) or through the
``GPTFAST_BACKEND`` environment variable; the default is ``fused`` on CUDA and ``torch``
on CPU. A model holds one ``Backend`` that every layer reads, so switching it switches
the whole model in place.
"""
import os
from types import ModuleType

import torch

from gptfast import ops, reference
from gptfast.ops import torch_path

MODULES = {"reference": reference, "torch": torch_path, "fused": ops}
BACKENDS = tuple(MODULES)
ENV_VAR = "GPTFAST_BACKEND"


def resolve_backend(name=None) -> str:
    """The backend to use: ``name``, else $GPTFAST_BACKEND, else the device default."""
    name = name or os.environ.get(ENV_VAR) or ("fused" if torch.cuda.is_available() else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def backend_module(name=None) -> ModuleType:
    """The module of backend ``name`` (resolved as ``resolve_backend`` does)."""
    return MODULES[resolve_backend(name)]


class Backend:
    """The backend a model's modules share: one per model, handed to every layer it
    builds and switched in place by ``set``. ``ops`` is the backend's module."""

    def __init__(self, name=None):
        self.set(name)

    def set(self, name=None) -> None:
        self.name = resolve_backend(name)
        self.ops = backend_module(self.name)

    def __getstate__(self):  # modules do not pickle: keep the name, look the module up again
        return {"name": self.name}

    def __setstate__(self, state):
        self.set(state["name"])
