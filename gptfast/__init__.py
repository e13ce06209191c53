"""gptfast: a GPT-2-family engine with fused Triton kernels, a C++ sampling loop and
pure-PyTorch reference twins that verify them."""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

__version__ = "0.1.0"


def checkout_root() -> Optional[Path]:
    """The repository root when this gptfast is a source checkout's, else None. A checkout
    is recognised by ``setup.py`` and ``kernels/_registry.py`` beside the package, never by
    the bare directory name: an installed gptfast's parent is site-packages, where
    ``kernels`` is another distribution."""
    root = Path(os.path.abspath(__file__)).parent.parent
    if (root / "setup.py").is_file() and (root / "kernels" / "_registry.py").is_file():
        return root
    return None


def source_dir(name: str) -> Path:
    """``kernels`` or ``csrc`` of this gptfast: beside the package in a checkout, inside it
    in an installed wheel (setup.py's ``package_dir``; the path may not exist, e.g. csrc/ of
    a wheel built without it)."""
    if name not in ("kernels", "csrc"):
        raise ValueError(f"source_dir: name must be 'kernels' or 'csrc', got {name!r}")
    root = checkout_root()
    return root / name if root is not None else Path(os.path.abspath(__file__)).parent / name


def _mount_kernels() -> None:
    """Mount the Triton kernels' directory as the package ``gptfast.kernels``.

    The directory is ``kernels/`` at the repository root in a source checkout (run from
    the tree, or an editable install) and ``gptfast/kernels/`` in a built wheel
    (setup.py's ``package_dir``); ``source_dir`` picks it. It has no
    ``__init__.py``, so that a checkout's ``kernels/`` on ``sys.path`` is a namespace
    portion and never shadows an installed distribution named ``kernels`` (see
    ``kernels/_registry.py``); the package spec is built here instead. The checkout's own
    kernels win over any installed mapping (a second checkout on ``sys.path`` must not
    run the kernels of the one that was pip-installed). Nothing is ever imported as a
    top-level ``kernels`` module.
    """
    if "gptfast.kernels" in sys.modules:
        return
    kernel_dir = source_dir("kernels")
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
