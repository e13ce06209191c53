"""Loading the C++ sampling extension (csrc/), or falling back to its Python twin.

``load_extension()`` tries, in order: nothing when ``$GPTFAST_NO_EXT=1``; the
setup.py-built ``gptfast._C``; a JIT build of csrc/ into ``gptfast.runtime.paths.cache_dir()``.
Whatever fails ends in the Python twin (``gptfast.reference.sampler``) with one warning
line, never in an exception or a hang. ``extension_status(build=False)`` says which
sampler would serve generation without building anything (``gptfast info``), and
``python -m gptfast.runtime.extension`` prints it (exit status 0 when the C++ extension loads).

A JIT build runs under gptfast's own lock (``fcntl.flock`` on ``gptfast.lock`` in the
build directory), which the kernel releases when its holder dies. torch's builder takes a
second, plain-file lock (``lock`` in the same directory) that a killed build leaves
behind, after which torch waits on it forever; while holding its own lock gptfast knows
that file is stale and removes it. A live build by another process is waited for at most
``$GPTFAST_EXT_LOCK_TIMEOUT`` seconds (default 900), then the twin serves.
"""
import glob
import hashlib
import importlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from gptfast.runtime import paths

EXTENSION_API_VERSION = 7  # must match kApiVersion in csrc/sampling.cpp
# Compiler flags of every build; setup.py repeats them (a test keeps the two identical).
# ISO C++ (not gnu++) keeps the compiler from fusing a * b + c into an FMA, which would
# round differently from the twin; -fno-trapping-math lets branch-free loops with a
# division vectorise (rounding unchanged); -g0 drops the debug information that Python's
# CFLAGS ask for (it doubles the build time of csrc/sampling.cpp); -fopenmp turns on
# at::parallel_for, which is inline OpenMP in ATen's headers: without it every parallel_for
# of csrc/ runs on one thread (the link flag resolves to the libgomp torch already loaded).
EXTENSION_CFLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-g0", "-fopenmp"]
EXTENSION_LDFLAGS = ["-fopenmp"]
NO_EXT_ENV = "GPTFAST_NO_EXT"
LOCK_TIMEOUT_ENV = "GPTFAST_EXT_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 900.0


class SamplingExtensionWarning(UserWarning):
    """The C++ sampler could not be loaded or built; gptfast uses the Python twin."""


@dataclass
class _Loaded:
    module: object = None
    status: str = ""
    tried: bool = False


_loaded = _Loaded()


def source_files() -> list:
    """csrc/*.cpp: beside the package in a source checkout, inside it in an installed wheel
    (``gptfast.runtime.paths.source_dir``)."""
    return sorted(glob.glob(os.path.join(paths.source_dir("csrc"), "*.cpp")))


def header_files() -> list:
    """csrc/*.h, which the sources include: a build reads them too."""
    return sorted(glob.glob(os.path.join(paths.source_dir("csrc"), "*.h")))


def _prebuilt():
    """gptfast._C as built by setup.py, or (None, reason)."""
    try:
        module = importlib.import_module("gptfast._C")
    except ImportError as e:
        return None, f"gptfast._C not built ({e})"
    if getattr(module, "API_VERSION", None) != EXTENSION_API_VERSION:
        return None, f"gptfast._C is API version {getattr(module, 'API_VERSION', None)}, expected {EXTENSION_API_VERSION}"
    built = getattr(module, "__file__", None)
    sources = source_files() + header_files()
    if built and sources and max(os.path.getmtime(s) for s in sources) > os.path.getmtime(built):
        return None, "gptfast._C is older than csrc/ (rebuild with pip install --no-build-isolation -e .)"
    return module, f"C++ extension gptfast._C ({built})"


def _jit_target(sources):
    """(module name, build directory) of a JIT build: keyed by sources, torch, Python, flags."""
    digest = hashlib.sha256()
    for path in sources + header_files():
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(f"{torch.__version__} {sys.version} {EXTENSION_API_VERSION} {EXTENSION_CFLAGS} "
                  f"{EXTENSION_LDFLAGS}".encode())
    tag = digest.hexdigest()[:16]
    return f"gptfast_sampling_{tag}", str(paths.cache_dir(f"ext-{tag}"))


def _is_built(name, build_dir) -> bool:
    return bool(glob.glob(os.path.join(build_dir, f"{name}*.so")) + glob.glob(os.path.join(build_dir, f"{name}*.pyd")))


def _lock_timeout() -> float:
    value = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


class _BuildLock:
    """gptfast's lock on a build directory, waited for at most ``timeout`` seconds."""

    def __init__(self, build_dir: str, timeout: float):
        self.path, self.timeout, self.file = os.path.join(build_dir, "gptfast.lock"), timeout, None

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "a")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.file.close()
                    raise TimeoutError(f"another process has been building in {os.path.dirname(self.path)} "
                                       f"for over {self.timeout:g} s ({LOCK_TIMEOUT_ENV})") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.file.close()  # closing releases the flock


def _jit(sources):
    """Build (once, cached by source and torch version) and load the extension."""
    from torch.utils import cpp_extension

    name, build_dir = _jit_target(sources)
    os.makedirs(build_dir, exist_ok=True)
    with _BuildLock(build_dir, _lock_timeout()):
        stale = os.path.join(build_dir, "lock")  # torch's baton: only a killed build leaves it now
        if os.path.exists(stale):
            print(f"gptfast: removing a stale build lock left by a killed build: {stale}", file=sys.stderr, flush=True)
            os.remove(stale)
        if not _is_built(name, build_dir):
            print(f"gptfast: building the C++ sampling extension (first use; minutes on a small CPU) in {build_dir}",
                  file=sys.stderr, flush=True)
        module = cpp_extension.load(name=name, sources=list(sources), build_directory=build_dir,
                                    extra_cflags=list(EXTENSION_CFLAGS),  # copies: torch appends to them
                                    extra_ldflags=list(EXTENSION_LDFLAGS), verbose=False)
    if getattr(module, "API_VERSION", None) != EXTENSION_API_VERSION:
        raise RuntimeError(f"built extension has API version {getattr(module, 'API_VERSION', None)}")
    return module, f"C++ extension, JIT-built in {build_dir}"


def _without_building():
    """(module, one line, whether a JIT build could still help), trying all but a build."""
    if os.environ.get(NO_EXT_ENV) == "1":
        return None, f"{NO_EXT_ENV}=1", False
    module, line = _prebuilt()
    if module is not None:
        return module, line, False
    if not source_files():
        return None, f"{line}; no csrc/*.cpp to build from", False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"{line}; no C++ compiler ({compiler}) to build it", False
    return None, line, True


def load_extension():
    """The C++ sampler module, or None (after a one-line warning) to use the Python twin.
    The outcome is remembered."""
    if _loaded.tried:
        return _loaded.module
    _loaded.tried = True
    module, line, can_build = _without_building()
    if module is not None:
        _loaded.module, _loaded.status = module, line
        return module
    if not can_build:
        return _fall_back(line)
    try:
        _loaded.module, _loaded.status = _jit(source_files())
    except Exception as e:  # a failed build must not take generation down with it
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return _fall_back(f"JIT build failed: {first_line[:200]}")
    return _loaded.module


def _fall_back(reason: str):
    _loaded.module, _loaded.status = None, f"Python twin ({reason})"
    warnings.warn(
        f"gptfast: C++ sampling extension unavailable ({reason}); using the Python twin (same tokens, slower loop)",
        SamplingExtensionWarning,
        stacklevel=3,
    )
    return None


def extension_status(build: bool = True) -> str:
    """One line: which sampler implementation serves generation here. ``build=False``
    never builds (nor waits on a build): it reports what the first use would find."""
    if build or _loaded.tried:
        load_extension()
        return _loaded.status
    module, line, can_build = _without_building()
    if module is not None:
        return line
    if not can_build:
        return f"Python twin ({line})"
    name, build_dir = _jit_target(source_files())
    if _is_built(name, build_dir):
        return f"C++ extension, JIT-built in {build_dir} (loaded on first use)"
    return f"C++ extension not built yet: the first generation JIT-builds it into {build_dir}"


def reset_extension_cache() -> None:
    """Forget the loader's outcome (tests, or after building the extension in-process)."""
    global _loaded
    _loaded = _Loaded()


def cpu_op(name: str):
    """``torch.ops.gptfast_cpu.<name>`` (the op's overload packet), registered by the loaded
    extension, or None: no extension here, or one without that op. Loads the extension."""
    if load_extension() is None:
        return None
    try:
        return getattr(torch.ops.gptfast_cpu, name)
    except (AttributeError, RuntimeError):
        return None


if __name__ == "__main__":
    status = extension_status(build=False)
    print(status)
    sys.exit(0 if status.startswith("C++ extension gptfast._C") else 1)

