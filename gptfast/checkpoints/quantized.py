"""The weight-only int8 checkpoint format (a model quantized by ``gptfast.quantize``).

``save_quantized(model, dir)`` writes ``model.safetensors`` with gptfast's own tensor names
and (N, K) nn.Linear layouts (not Hugging Face's Conv1D), and ``config.json``: the GPT-2
config of ``checkpoints.hf_gpt2.config_to_hf`` plus a ``"gptfast_quantization"`` entry
recording the scheme. ``load_quantized(dir)`` rebuilds the model from it;
``is_quantized_checkpoint(dir)`` tells such a directory from a Hugging Face one (the loader
asks). Transformers cannot load it. All three are public as ``gptfast.quantization.*``.
"""
import os

import torch

from gptfast.checkpoints.hf_gpt2 import (QUANTIZATION_KEY, CheckpointError, check_finite, config_from_hf,
                                         config_to_hf, load_state_dict, read_json, write_config, write_safetensors)
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.nn import Int8Linear, default_scale_dtype, replace_linears
from gptfast.runtime.atomic_files import make_output_dir
from gptfast.runtime.devices import dtype_name

SCHEMES = ("int8",)
CONFIG_KEY = QUANTIZATION_KEY
FORMAT_VERSION = 1


def check_gpt(model, what: str) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"{what}: model must be a gptfast.GPT, got {type(model).__name__}")


def is_quantized(model) -> bool:
    """Whether ``model`` holds int8 linear layers."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantization_entry(model) -> dict:
    """The ``"gptfast_quantization"`` entry of a quantized model's config.json."""
    scales = {m.scale.dtype for m in model.modules() if isinstance(m, Int8Linear)}
    return {"scheme": "int8", "format_version": FORMAT_VERSION,
            "scale_dtype": dtype_name(scales.pop()) if len(scales) == 1 else "mixed"}


def save_quantized(model, path) -> None:
    """Write ``config.json`` (with the scheme) and ``model.safetensors`` of a quantized GPT."""
    check_gpt(model, "save_quantized")
    if not is_quantized(model):
        raise ValueError("save_quantized: the model is not quantized (call gptfast.quantize(model, 'int8') first, "
                         "or save it with GPT.save_pretrained)")
    path = make_output_dir(path, "save_quantized")
    state = {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}
    write_safetensors(path, state, gptfast_quantization="int8")
    write_config(path, dict(config_to_hf(model.config), **{CONFIG_KEY: quantization_entry(model)}))


def is_quantized_checkpoint(path) -> bool:
    """Whether ``path`` is a directory written by ``save_quantized``."""
    config_path = os.path.join(os.fspath(path), "config.json")
    return os.path.isfile(config_path) and CONFIG_KEY in read_json(config_path)


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
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    hf = read_json(os.path.join(path, "config.json"))
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
    check_finite(state, path)
    wte = state.get("transformer.wte.weight")
    float_dtype = wte.dtype if wte is not None else torch.float32
    scale = state.get("lm_head.scale")
    scale_dtype = scale.dtype if scale is not None else default_scale_dtype(float_dtype)
    model = GPT(saved, backend=backend).to(float_dtype)
    replace_linears(model, lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                  scale_dtype=scale_dtype, dtype=float_dtype))
    _check_state(state, model.state_dict(), path)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype)
    return model.eval()
