"""Where gptfast keeps files between runs: one cache directory for everything it builds
or derives (the JIT-built C++ extension, tokenised data).

``$GPTFAST_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/gptfast``, else ``~/.cache/gptfast``.
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
