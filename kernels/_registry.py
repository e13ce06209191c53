"""Triton kernels of gptfast, importable as ``gptfast.kernels`` (and never as ``kernels``).

``kernels/`` has no ``__init__.py`` on purpose: it is a namespace portion, so with the
repository root on ``sys.path`` (pytest, ``python -m gptfast`` from a checkout) it never
shadows an installed distribution named ``kernels`` (Hugging Face's, which transformers
imports). ``gptfast/__init__.py`` mounts the directory as the package ``gptfast.kernels``
itself, with this docstring; ``KERNEL_MODULES`` lives here, in ``_registry``, for the
same reason.

Kernels know tensors, not models. Each module holds its kernels, their launchers and
the little shape logic they need, plus ``static_configs()``: the shipped kernel
configurations that ``gptfast.compile_report`` compiles for sm_90 on any machine, and
``candidate_configs()`` / ``precision_configs()``: its tuning candidates (``CANDIDATES``,
timed by ``gptfast.tune``) and the fp32 entries whose PTX must round to nearest, which the
report compiles too. ``_common`` holds what every kernel module shares (constants, output
allocation, device guard, ``LaunchConfig``, the static-entry builder); ``_tuned`` reads
the per-device tuned tables in ``tuned/``, which the launchers prefer on their device.

Importing this package (or ``_registry``) does not import triton; importing a kernel module does, so set
``TRITON_INTERPRET=1`` before that when running on a CPU.
"""

# Modules whose static_configs() the compile report visits, in report order.
KERNEL_MODULES = ("layer_norm", "causal_attention", "decode_attention", "int8_linear", "skinny_linear",
                  "linear_cross_entropy")
