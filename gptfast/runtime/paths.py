"""Where gptfast keeps files between runs, and where its non-package sources are.

``cache_dir()``: one cache directory for everything gptfast builds or derives (the
JIT-built C++ extension, tokenised data): ``$GPTFAST_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/gptfast``, else ``~/.cache/gptfast``.

``source_dir("kernels")`` / ``source_dir("csrc")``: in a source checkout (run from the
tree, or installed editable) these directories sit beside the package, at the
repository root; a built wheel carries them inside it, as ``gptfast/kernels`` and
``gptfast/csrc`` (setup.py's ``package_dir``). A checkout is recognised by ``setup.py``
and ``kernels/_registry.py`` beside the package, never by the bare directory name: an
installed gptfast's parent is site-packages, where ``kernels`` is another distribution.
"""
import os
from pathlib import Path

CACHE_ENV = "GPTFAST_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """The cache directory, or a path below it (not created)."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "gptfast")
    return Path(base).joinpath(*parts)


# Where the non-package sources are is known by the package root, which needs it to mount the
# kernels before anything else of gptfast imports; it is re-exported here for the rest.
from gptfast import checkout_root, source_dir  # noqa: E402,F401
