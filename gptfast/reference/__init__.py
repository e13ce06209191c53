"""Reference twins: pure PyTorch, one for every fused op (and, in ``sampling``, for the sampler)."""
from gptfast.reference.functional import causal_attention, decode_attention, gelu, layer_norm
from gptfast.reference.int8_linear import int8_linear
from gptfast.reference.linear_cross_entropy import linear_cross_entropy
from gptfast.reference.skinny_linear import skinny_linear, skinny_linear_kv

__all__ = ["causal_attention", "decode_attention", "gelu", "int8_linear", "layer_norm", "linear_cross_entropy",
           "skinny_linear", "skinny_linear_kv"]
