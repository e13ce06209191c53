"""Public drop-in fused ops.

Each validates its inputs, dispatches (Triton on CUDA or under the interpreter,
otherwise the torch path) and is registered through ``torch.library.custom_op`` with
fake and autograd registrations, so ``torch.compile(fullgraph=True)`` and CUDA graph
capture see a single op. Importing ``gptfast.ops`` imports neither triton nor any
kernel: an op imports its kernel module on its first Triton launch.

Each op's module has the op's name (``gptfast.ops.layer_norm`` …, see
``gptfast.ops.registry``), and the package binds that name to the op function, so
``gptfast.ops.layer_norm`` is the function; reach a module itself through
``importlib.import_module("gptfast.ops.layer_norm")``.

The package is also the ``fused`` backend of a model (``gptfast.backends``): with
``gelu`` (the torch path's: PyTorch's own GELU is already one fused elementwise kernel)
it has the four functions every backend module has. ``gptfast.ops.torch_path`` is the
``torch`` backend and each op's fallback.
"""
from gptfast.ops.causal_attention import causal_attention
from gptfast.ops.decode_attention import decode_attention
from gptfast.ops.int8_linear import int8_linear
from gptfast.ops.layer_norm import layer_norm
from gptfast.ops.linear_cross_entropy import linear_cross_entropy
from gptfast.ops.skinny_linear import skinny_linear, skinny_linear_kv
from gptfast.ops.torch_path import gelu

__all__ = ["causal_attention", "decode_attention", "gelu", "int8_linear", "layer_norm", "linear_cross_entropy",
           "skinny_linear", "skinny_linear_kv"]
