"""gptfast: a GPT-2-family engine with fused Triton kernels, a C++ sampling loop and
pure-PyTorch reference twins that verify them."""
import importlib
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"


def _mount_kernels() -> None:
    """Mount the Triton kernels' directory as the package ``gptfast.kernels``.

    The directory is ``kernels/`` at the repository root in a source checkout (run from
    the tree, or an editable install) and ``gptfast/kernels/`` in a built wheel
    (setup.py's ``package_dir``); ``gptfast.paths.source_dir`` picks it. It has no
    ``__init__.py``, so that a checkout's ``kernels/`` on ``sys.path`` is a namespace
    portion and never shadows an installed distribution named ``kernels`` (see
    ``kernels/_registry.py``); the package spec is built here instead. The checkout's own
    kernels win over any installed mapping (a second checkout on ``sys.path`` must not
    run the kernels of the one that was pip-installed). Nothing is ever imported as a
    top-level ``kernels`` module.
    """
    if "gptfast.kernels" in sys.modules:
        return
    from gptfast import paths

    kernel_dir = paths.source_dir("kernels")
    if not (kernel_dir / "_registry.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec("gptfast.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(kernel_dir)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["gptfast.kernels"] = module
    globals()["kernels"] = module  # attribute access (gptfast.kernels.X), as a regular import would set
    module.__doc__ = importlib.import_module("gptfast.kernels._registry").__doc__


_mount_kernels()

# Public names, imported lazily so that `import gptfast` stays cheap (no triton, no extension build).
_LAZY = {
    "GPT": "gptfast.model",
    "GPTConfig": "gptfast.config",
    "KVCache": "gptfast.model",
    "SamplingParams": "gptfast.sampling",
    "generate": "gptfast.generation",
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
