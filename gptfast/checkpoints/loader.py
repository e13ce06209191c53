"""One way to get a model and its tokenizer, for every verb (train, eval, generate, profile).

A model comes from a directory or from a preset:

- a weight-only int8 directory (``gptfast quantize``; see gptfast.checkpoints.quantized);
- a gptfast run directory (``checkpoint.pt``; the weights of its latest checkpoint, and
  the tokenizer it was trained with), or a Hugging Face GPT-2 directory (``config.json`` +
  weights). A run directory that has exported its final model holds both: the checkpoint
  is read, since it is what a resumed run would continue from;
- a preset name (``GPTConfig.from_preset``), randomly initialised from ``seed``.

The tokenizer is the one given, else the directory's own files, else the one the run was
trained with, else the byte tokenizer; it must fit the model's vocabulary (checked here,
and only here).
"""
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from gptfast.checkpoints import quantized
from gptfast.checkpoints import training_state as ckpt_io
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.tokenizer import has_tokenizer_files, load_tokenizer

# Settings of a directory's model that a caller may change without retraining it.
CHANGEABLE_IN_A_LOADED_MODEL = ("dropout",)


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module  # a GPT, on the device and in the dtype asked for
    tokenizer: object  # gptfast.tokenizer.BPETokenizer or ByteTokenizer
    tokenizer_path: Optional[str]  # where the tokenizer's files are (None: the byte tokenizer)


def check_vocabulary(tokenizer, model) -> None:
    """Raise ValueError when the tokenizer can produce ids the model has no embedding for."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer ({getattr(tokenizer, 'name', type(tokenizer).__name__)}) has {tokenizer.vocab_size} "
            f"tokens but the model's vocabulary is {model.config.vocab_size}: use the model's own tokenizer"
        )


def load_model_and_tokenizer(
    model_dir=None,
    *,
    preset: str = "tiny",
    tokenizer=None,
    overrides: Optional[dict] = None,
    vocab_from_tokenizer: bool = False,
    backend: Optional[str] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> Loaded:
    """The model in ``model_dir``, or a fresh ``preset`` model, and its tokenizer.

    ``tokenizer``: a tokenizer.json file or a directory with one (default: see the module
    docstring). ``overrides``: GPTConfig fields; for a fresh model any (e.g. n_layer,
    block_size), for a directory's model only ``CHANGEABLE_IN_A_LOADED_MODEL``.
    ``vocab_from_tokenizer``: a fresh model's vocabulary is the tokenizer's (unless
    ``overrides`` sets vocab_size). ``device``, ``dtype``: where the model goes (default:
    the CPU, float32). ``seed``: the initial weights of a fresh model.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model_dir is not None:
        model, own_tokenizer = _model_from_dir(model_dir, overrides, backend, device, dtype)
        tokenizer_path = tokenizer if tokenizer is not None else own_tokenizer
        tok = load_tokenizer(tokenizer_path)
    else:
        tokenizer_path = tokenizer
        tok = load_tokenizer(tokenizer_path)
        if vocab_from_tokenizer:
            overrides.setdefault("vocab_size", tok.vocab_size)
        model = _fresh_model(preset, overrides, backend, seed)
    check_vocabulary(tok, model)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return Loaded(model, tok, None if tokenizer_path is None else str(tokenizer_path))


def _fresh_model(preset: str, overrides: dict, backend, seed: int):
    torch.manual_seed(seed)  # the same initial weights wherever it is built (every rank of a run)
    return GPT(GPTConfig.from_preset(preset, **overrides), backend=backend)


def _model_from_dir(path, overrides: dict, backend, device=None, dtype=None):
    """``(model, tokenizer path or None)`` from a run directory, a quantized directory or a
    Hugging Face directory."""
    if not Path(path).is_dir():
        what = "is a file, not a directory" if Path(path).exists() else "does not exist"
        raise FileNotFoundError(f"model directory {str(path)!r} {what}")
    fixed = sorted(set(overrides) - set(CHANGEABLE_IN_A_LOADED_MODEL))
    if fixed:
        given = ", ".join(f"{k}={overrides[k]!r}" for k in fixed)
        raise ValueError(f"{given} cannot be changed when starting from the model in {str(path)!r} (its own "
                         f"config holds them); drop those settings, or start a fresh model without --init")
    path = Path(path)
    own_tokenizer = str(path) if has_tokenizer_files(path) else None
    if ckpt_io.checkpoint_path(path).exists():
        state = ckpt_io.load_checkpoint(ckpt_io.checkpoint_path(path))
        model = GPT(GPTConfig.from_dict(state["model_config"]), backend=backend)
        model.load_state_dict(state["model"])
        own_tokenizer = own_tokenizer or state["train_config"].get("tokenizer")
    elif quantized.is_quantized_checkpoint(path):
        model = quantized.load_quantized(str(path), backend=backend, device=device, dtype=dtype)
    elif (path / "config.json").exists():
        model = GPT.from_pretrained(str(path), backend=backend, device=device, dtype=dtype)  # loaded in place
    else:
        raise FileNotFoundError(
            f"{path} holds neither a training checkpoint ({ckpt_io.CHECKPOINT_NAME}) nor a Hugging Face model (config.json)"
        )
    if "dropout" in overrides:
        model.config.dropout = overrides["dropout"]
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = overrides["dropout"]
    return model, own_tokenizer
