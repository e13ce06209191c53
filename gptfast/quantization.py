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
weight reordered once into the C++ kernel's blocked layout (``gptfast.cpu_linear``); the
module itself, its state dict and its checkpoints keep the public (N, K) layout.

Checkpoints. ``save_quantized(model, dir)`` writes ``model.safetensors`` with gptfast's
own tensor names and (N, K) nn.Linear layouts (not Hugging Face's Conv1D), and
``config.json``: the GPT-2 config of ``gptfast.hf.config_to_hf`` plus a
``"gptfast_quantization"`` entry recording the scheme. ``load_quantized(dir)`` rebuilds
the model from it; ``is_quantized_checkpoint(dir)`` tells the two kinds of directory
apart (for ``GPT.from_pretrained``). Transformers cannot load such a directory.

The module is ``gptfast.quantization``, not ``gptfast.quantize``: a submodule of that name
would replace the package attribute ``gptfast.quantize`` (the function) once imported.
"""
import json
import os

import torch
import torch.nn as nn

from gptfast.config import GPTConfig
from gptfast.hf import QUANTIZATION_KEY, SAFETENSORS, CheckpointError, config_from_hf, config_to_hf
from gptfast.ops.int8_linear import int8_linear, quantize_weight

SCHEMES = ("int8",)
CONFIG_KEY = QUANTIZATION_KEY
FORMAT_VERSION = 1


class Int8Linear(nn.Module):
    """A linear layer with an int8 (out, in) weight and one scale per output channel.

    Buffers ``weight_int8`` (int8), ``scale`` (float32 or the model's bfloat16) and
    ``bias`` (or None). Forward runs ``gptfast.ops.int8_linear`` (inference-only).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scale_dtype=torch.float32,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype=None) -> "Int8Linear":
        """Quantize ``linear`` (its weight is copied, not shared)."""
        weight = linear.weight
        scale_dtype = default_scale_dtype(weight.dtype) if scale_dtype is None else scale_dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scale_dtype=scale_dtype,
                     dtype=weight.dtype, device=weight.device)
        module.weight_int8, module.scale = quantize_weight(weight, scale_dtype)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x):
        return int8_linear(x, self.weight_int8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale_dtype={self.scale.dtype}")


def default_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 scales for a bfloat16 model, float32 otherwise."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def _check_gpt(model, what: str) -> None:
    from gptfast.model import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"{what}: model must be a gptfast.GPT, got {type(model).__name__}")


def is_quantized(model) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def _linear_names(model) -> list:
    """Qualified names of the nn.Linear layers of ``model``, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model, names, make) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def quantize(model, scheme: str = "int8", *, scale_dtype=None):
    """Quantize ``model`` (a gptfast GPT) in place and return it; see the module docstring.

    ``scale_dtype``: None (bfloat16 for a bfloat16 model, else float32), or a torch dtype.
    Raises ValueError for an unknown scheme or a model that is already quantized.
    """
    _check_gpt(model, "quantize")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    if is_quantized(model):
        raise ValueError("quantize: the model is already quantized (int8); quantize the floating-point model once")
    if scale_dtype is not None and scale_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: scale_dtype {scale_dtype} is not float32, bfloat16 or float16")
    with torch.no_grad():
        _replace(model, _linear_names(model), lambda linear: Int8Linear.from_linear(linear, scale_dtype))
    return model


# ---- checkpoints ---------------------------------------------------------------------


def quantization_entry(model) -> dict:
    """The ``"gptfast_quantization"`` entry of a quantized model's config.json."""
    scales = {m.scale.dtype for m in model.modules() if isinstance(m, Int8Linear)}
    return {"scheme": "int8", "format_version": FORMAT_VERSION,
            "scale_dtype": str(scales.pop()).replace("torch.", "") if len(scales) == 1 else "mixed"}


def save_quantized(model, path) -> None:
    """Write ``config.json`` (with the scheme) and ``model.safetensors`` of a quantized GPT."""
    from safetensors.torch import save_file

    _check_gpt(model, "save_quantized")
    if not is_quantized(model):
        raise ValueError("save_quantized: the model is not quantized (call gptfast.quantize(model, 'int8') first, "
                         "or save it with GPT.save_pretrained)")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}
    tmp = os.path.join(path, SAFETENSORS + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "gptfast_quantization": "int8"})
    os.replace(tmp, os.path.join(path, SAFETENSORS))
    config = dict(config_to_hf(model.config), **{CONFIG_KEY: quantization_entry(model)})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _read_config(path) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: missing config.json")
    with open(config_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None


def is_quantized_checkpoint(path) -> bool:
    """Whether ``path`` is a directory written by ``save_quantized``."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "config.json")) and CONFIG_KEY in _read_config(path)


def _config_mismatch(saved: GPTConfig, wanted: GPTConfig) -> list:
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: checkpoint {a[k]!r}, given {b.get(k)!r}" for k in a if a[k] != b.get(k)]


def _check_state(state: dict, expected: dict, path) -> None:
    """Every expected tensor present with its shape and dtype, nothing unexpected."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {key!r} is {tuple(got.shape)} {got.dtype}, "
                                  f"the model expects {tuple(want.shape)} {want.dtype}")


def load_quantized(path, config: GPTConfig = None, *, backend=None, device=None, dtype=None):
    """The quantized GPT saved in ``path`` by ``save_quantized``.

    ``config``: when given, the checkpoint must have been saved from exactly this
    config, else CheckpointError names the differing fields. ``dtype`` casts the
    floating-point tensors (embeddings, layernorms, biases, scales); int8 weights stay.
    """
    from gptfast.hf import load_state_dict
    from gptfast.model import GPT

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    hf = _read_config(path)
    entry = hf.get(CONFIG_KEY)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: config.json records no {CONFIG_KEY!r} scheme: not a quantized checkpoint "
                              f"(load it with GPT.from_pretrained)")
    if entry.get("scheme") not in SCHEMES or entry.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: quantization {entry} is not supported (scheme int8, format {FORMAT_VERSION})")
    saved = config_from_hf(hf)
    if config is not None:
        mismatch = _config_mismatch(saved, config)
        if mismatch:
            raise CheckpointError(f"{path}: the checkpoint does not match the given config: {'; '.join(mismatch)}")
    state = load_state_dict(path)
    wte = state.get("transformer.wte.weight")
    float_dtype = wte.dtype if wte is not None else torch.float32
    scale = state.get("lm_head.scale")
    scale_dtype = scale.dtype if scale is not None else default_scale_dtype(float_dtype)
    model = GPT(saved, backend=backend).to(float_dtype)
    _replace(model, _linear_names(model), lambda lin: Int8Linear(
        lin.in_features, lin.out_features, lin.bias is not None, scale_dtype=scale_dtype, dtype=float_dtype))
    _check_state(state, model.state_dict(), path)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype)
    return model.eval()
