"""Weight-only int8 quantization of a gptfast GPT, and its checkpoints.

``quantize(model, "int8")`` replaces every linear layer of a ``gptfast.GPT`` (each
block's ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, and the
``lm_head``) in place by an :class:`Int8Linear`: symmetric per-output-channel int8
weights (``gptfast.ops.int8_linear.quantize_weight``) with scales in float32, or in
bfloat16 for a bfloat16 model, computed through ``gptfast.ops.int8_linear``. Activations
stay in floating point (weight-only), and so do layernorms, biases and embeddings.

The tied embedding / LM head. GPT-2 ties ``lm_head.weight`` to the token embedding
``transformer.wte.weight``. After quantization they are no longer one tensor: the
embedding lookup stays in floating point (a decode step reads only B of its rows, so
int8 would save nothing there), and the LM head, a full (vocab x width) matmul read on
every step, gets its own int8 copy of the same matrix. A quantized checkpoint stores
both; the head's copy costs a quarter of the embedding's bytes.

On the CPU, ``gptfast.generate`` runs each Int8Linear (float32 scales) on a copy of its
weight reordered once into the C++ kernel's blocked layout (``gptfast.generation.cpu_linear``);
the module itself, its state dict and its checkpoints keep the public (N, K) layout.

Checkpoints. ``save_quantized(model, dir)``, ``load_quantized(dir)`` and
``is_quantized_checkpoint(dir)`` are the format's (``gptfast.checkpoints.quantized``),
public here beside ``quantize``. The layer is ``gptfast.nn.Int8Linear``.

The module is ``gptfast.quantization``, not ``gptfast.quantize``: a submodule of that name
would replace the package attribute ``gptfast.quantize`` (the function) once imported.
"""

import torch

from gptfast.checkpoints.quantized import (CONFIG_KEY, SCHEMES, check_gpt, is_quantized, is_quantized_checkpoint,
                                           load_quantized, save_quantized)
from gptfast.nn import Int8Linear, replace_linears

__all__ = ["quantize", "is_quantized", "save_quantized", "load_quantized", "is_quantized_checkpoint", "Int8Linear",
           "CONFIG_KEY", "SCHEMES"]


def _check_finite_weights(model) -> None:
    """A NaN or inf weight would quantize to a finite row (its scale 1.0, its weights 0),
    hiding what the float model shows: refuse it, naming the parameter."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(f"quantize: parameter {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                             "quantizing would hide them behind finite int8 weights")


def quantize(model, scheme: str = "int8", *, scale_dtype=None):
    """Quantize ``model`` (a gptfast GPT) in place and return it; see the module docstring.

    ``scale_dtype``: None (bfloat16 for a bfloat16 model, else float32), or a torch dtype.
    Raises ValueError for an unknown scheme, a model that is already quantized, or a
    non-finite parameter (named).
    """
    check_gpt(model, "quantize")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    if is_quantized(model):
        raise ValueError("quantize: the model is already quantized (int8); quantize the floating-point model once")
    if scale_dtype is not None and not isinstance(scale_dtype, torch.dtype):
        raise TypeError(f"quantize: scale_dtype must be None or a torch.dtype (torch.float32, torch.bfloat16 or "
                        f"torch.float16), got {type(scale_dtype).__name__} {scale_dtype!r}")
    if scale_dtype is not None and scale_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: scale_dtype {scale_dtype} is not torch.float32, torch.bfloat16 or torch.float16")
    _check_finite_weights(model)
    with torch.no_grad():
        replace_linears(model, lambda linear: Int8Linear.from_linear(linear, scale_dtype))
    return model
