"""gptfast: a GPT-2-family engine with fused Triton kernels, a C++ sampling loop and
pure-PyTorch reference twins that verify them."""
import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _mount_kernels() -> None:
    """Make ``kernels/`` importable as ``gptfast.kernels`` in a source checkout.

    An installed wheel maps ``kernels/`` to ``gptfast.kernels`` through setup.py's
    ``package_dir`` (no ``kernels/`` beside the package there). Running straight from a checkout (``python -m
    gptfast`` with the repository on ``sys.path``) has no such mapping, so mount the
    directory beside this package under the same name. Nothing is ever installed as a
    top-level ``kernels`` module.
    """
    if "gptfast.kernels" in sys.modules:
        return
    kernel_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(kernel_dir, "__init__.py")
    # The checkout's own kernels win over any installed mapping (a second checkout on
    # sys.path must not run the kernels of the one that was pip-installed).
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location("gptfast.kernels", init, submodule_search_locations=[kernel_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gptfast.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # attribute access (gptfast.kernels.X), as a regular import would set


_mount_kernels()

# Public names, imported lazily so that `import gptfast` stays cheap (no triton, no extension build).
_LAZY = {
    "GPT": "gptfast.model",
    "GPTConfig": "gptfast.config",
    "KVCache": "gptfast.kv_cache",
    "SamplingParams": "gptfast.generation.sampling_params",
    "generate": "gptfast.generation.generate",
    "load_tokenizer": "gptfast.tokenizer",
    "quantize": "gptfast.quantization",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
