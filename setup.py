"""gptfast: a GPT-2-family engine with fused Triton kernels and a C++ sampling loop.

The Triton kernels live in ``kernels/`` at the top of the repository and install as
``gptfast.kernels`` (never as a top-level ``kernels`` module: ``kernels`` is another
distribution's name, which is also why ``kernels/`` has no ``__init__.py``; see
``kernels/_registry.py``). The wheel carries the C++ sources as ``gptfast/csrc/`` for the
JIT fallback (``gptfast.source_dir``). The C++ sampling
extension in ``csrc/`` is built here when torch is importable at build time
(``pip install --no-build-isolation -e .``); otherwise gptfast JIT-builds it on first
use, and falls back to its Python twin if no compiler is available.
``python -m gptfast.runtime.extension`` checks afterwards that ``gptfast._C`` imports.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# kernels/ and csrc/ have no __init__.py: they are listed and mapped by hand.
packages = find_packages(include=["gptfast", "gptfast.*"]) + ["gptfast.kernels", "gptfast.csrc"]
package_dir = {"gptfast.kernels": "kernels", "gptfast.csrc": "csrc"}

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("GPTFAST_NO_BUILD_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable at build time: gptfast JIT-builds on first use
        pass
    else:
        # gptfast.runtime.extension.EXTENSION_CFLAGS / _LDFLAGS (the JIT build's flags), kept
        # identical by a test; -g0 comes after Python's own CFLAGS (-g) and wins over them.
        ext_modules = [CppExtension("gptfast._C", sources,
                                    extra_compile_args=["-O3", "-std=c++17", "-fno-trapping-math", "-g0", "-fopenmp"],
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="gptfast",
    version="0.1.0",
    description="GPT-2-family engine: fused Triton attention/layernorm, C++ sampling loop, PyTorch reference twins",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"gptfast.csrc": ["*.cpp", "*.h"], "gptfast.kernels": ["tuned/*.json", "tuned/README.md"]},
    # Loose on purpose: users on CUDA keep the torch they have.
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "hf": ["transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["gptfast = gptfast.cli:main"]},
)
