"""Triton kernels of gptfast, importable as ``gptfast.kernels``.

Kernels know tensors, not models. Each module holds its kernels, their launchers and
the little shape logic they need, plus ``static_configs()``: the shipped kernel
configurations that ``gptfast.compile_report`` compiles for sm_90 on any machine.

Importing this package does not import triton; importing a kernel module does, so set
``TRITON_INTERPRET=1`` before that when running on a CPU.
"""

# Modules whose static_configs() the compile report visits, in report order.
KERNEL_MODULES = ("layer_norm", "causal_attention", "decode_attention", "int8_linear")
