"""The Hugging Face GPT-2 checkpoint format: a local directory's config and weights under
gptfast's names, and a model's written back (``GPT.from_pretrained`` / ``save_pretrained``
call these; the format knows state dicts and configs, never the model class).

HF's GPT-2 stores the four projection weights as Conv1D, i.e. (in, out): transposed
relative to nn.Linear. Attention-mask buffers (``attn.bias``, ``attn.masked_bias``) of
older checkpoints are not weights and are ignored. Everything is local: nothing here
downloads.
"""
import json
import os

import torch

from gptfast.config import GPTConfig
from gptfast.runtime.atomic_files import check_writable_file, make_output_dir

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # the leading dot keeps c_attn.bias out
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing a file or does not match the model."""


# config.json key of a weight-only quantized checkpoint (checkpoints.quantized writes it):
# such a directory holds int8 tensors in gptfast's layout, which HF GPT-2 cannot read.
QUANTIZATION_KEY = "gptfast_quantization"
# config.json keys whose GPTConfig field has another name, for messages that name both.
HF_NAMES = {"block_size": "n_positions", "dropout": "resid_pdrop", "pos_embedding": "gptfast_pos_embedding"}


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config (a dict); errors name ``source``."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} must hold a JSON object, got {type(hf).__name__} {hf!r:.80}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise CheckpointError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU {TANH_GELUS}")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            n_inner=hf.get("n_inner"),
            dropout=hf.get("resid_pdrop", 0.0),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            pos_embedding=hf.get("gptfast_pos_embedding", "learned"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        key = next((hf_key for field, hf_key in HF_NAMES.items() if f"GPTConfig.{field} " in str(e)), None)
        raise CheckpointError(f"{source}: {e}" + (f" (config.json key {key!r})" if key else "")) from None


def config_to_hf(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "gptfast_pos_embedding": config.pos_embedding,
        # GPT-2's <|endoftext|> closes its 50257-token vocabulary; other vocabularies name none.
        **({"bos_token_id": 50256, "eos_token_id": 50256} if config.vocab_size == 50257 else {}),
    }


def _shards(index: dict, index_path) -> list:
    """The shard file names of a safetensors index's ``weight_map`` (tensor name -> file)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: needs a non-empty \"weight_map\" object (tensor name -> shard file)")
    bad = [f for f in weight_map.values() if not isinstance(f, str) or os.path.basename(f) != f or not f]
    if bad:
        raise CheckpointError(f"{index_path}: weight_map names {bad[0]!r}, not a shard file name in the directory")
    return sorted(set(weight_map.values()))


def check_finite(state: dict, path) -> None:
    """Raise naming the first floating tensor holding NaN or inf: safetensors carries no
    checksum, so overwritten bytes load silently as non-finite weights."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): "
                                  "the file is corrupt or was saved from a diverged model")


def _load_file(path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file: name it
        raise CheckpointError(f"could not read checkpoint file {path}: {type(e).__name__}: {e}") from None


def load_state_dict(path: str) -> dict:
    """The raw tensors of a checkpoint directory (safetensors, sharded safetensors, or .bin)."""
    if os.path.exists(os.path.join(path, SAFETENSORS)):
        return _load_file(os.path.join(path, SAFETENSORS))
    if os.path.exists(os.path.join(path, SAFETENSORS_INDEX)):
        index_path = os.path.join(path, SAFETENSORS_INDEX)
        state = {}
        for shard in _shards(read_json(index_path), index_path):
            shard_path = os.path.join(path, shard)
            if not os.path.exists(shard_path):
                raise CheckpointError(f"checkpoint shard {shard_path} named by {SAFETENSORS_INDEX} is missing")
            state.update(_load_file(shard_path))
        return state
    if os.path.exists(os.path.join(path, TORCH_BIN)):
        return _load_file(os.path.join(path, TORCH_BIN))
    raise CheckpointError(f"{path}: no weights file found (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})")


def hf_to_gptfast(hf_state: dict, expected: dict) -> dict:
    """Map HF GPT-2 tensor names onto a model's (``expected``: its state dict), transposing
    Conv1D weights; check every key and shape."""
    n_layer = len({k.split(".")[2] for k in expected if k.startswith("transformer.h.")})
    converted = {}
    for name, tensor in hf_state.items():
        if name.endswith(IGNORED_SUFFIXES):  # buffers
            continue
        if name == "lm_head.weight":  # the head is tied to wte: checked below, never loaded
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (no such parameter in a {n_layer}-layer GPT)")
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the model expects {tuple(expected[key].shape)}"
            )
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"tensor {name!r} is {tensor.dtype}, but the model's {key!r} is floating point: "
                                  "an integer tensor is not a weight (the file is not a GPT-2 checkpoint)")
        converted[key] = tensor
    missing = [k for k in expected if k not in converted and k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    converted["lm_head.weight"] = converted["transformer.wte.weight"]
    head = hf_state.get("lm_head.weight")
    if head is not None and not (head.shape == converted["lm_head.weight"].shape
                                 and torch.equal(head, converted["lm_head.weight"].to(head.dtype))):
        raise CheckpointError("tensor 'lm_head.weight' differs from 'transformer.wte.weight': the checkpoint has an "
                              "untied LM head, and a gptfast GPT ties its head to the token embedding (GPT-2's "
                              "tie_word_embeddings); loading it would discard the head")
    return converted


def read_json(path) -> dict:
    """A JSON file that must hold an object (a dict), or a CheckpointError naming the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{os.path.dirname(path)}: missing {os.path.basename(path)}")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(doc).__name__} {doc!r:.80}")
    return doc


def read_config(path) -> GPTConfig:
    """The GPTConfig of the HF GPT-2 directory ``path`` (errors name the directory or file)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise NotADirectoryError(f"{path!r} is a file, not a checkpoint directory: pass the directory holding "
                                 "config.json and the weights")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    hf_config = read_json(config_path)
    if QUANTIZATION_KEY in hf_config:
        raise CheckpointError(
            f"{path} holds a {hf_config[QUANTIZATION_KEY].get('scheme', 'quantized')!r} quantized gptfast checkpoint: "
            "load it with gptfast.quantization.load_quantized(path) (the CLI verbs and "
            "gptfast.checkpoints.loader.load_model_and_tokenizer do)"
        )
    return config_from_hf(hf_config, source=config_path)


def read_weights(path, expected: dict) -> dict:
    """The weights of the HF GPT-2 directory ``path`` under a model's names, checked against
    its state dict ``expected`` (names, shapes) and for non-finite values."""
    path = os.fspath(path)
    hf_state = load_state_dict(path)
    check_finite(hf_state, path)
    if "transformer.wpe.weight" not in expected:  # a sinusoidal model: its exported table is not a parameter
        hf_state = {k: v for k, v in hf_state.items() if not k.endswith("wpe.weight")}
    return hf_to_gptfast(hf_state, expected)


def write_safetensors(path, state: dict, **metadata) -> None:
    """``model.safetensors`` in directory ``path``, written to a temporary file and renamed."""
    from safetensors.torch import save_file

    target = os.path.join(path, SAFETENSORS)
    check_writable_file(target, "save")
    tmp = target + ".tmp"
    check_writable_file(tmp, "save")
    try:
        save_file(state, tmp, metadata={"format": "pt", **metadata})
        os.replace(tmp, target)
    except OSError as e:
        raise type(e)(f"could not write {target!r}: {e.strerror or e}") from None


def write_config(path, hf_config: dict) -> None:
    target = os.path.join(path, "config.json")
    check_writable_file(target, "save")
    try:
        with open(target, "w") as f:
            json.dump(hf_config, f, indent=2)
    except OSError as e:
        raise type(e)(f"could not write {target!r}: {e.strerror or e}") from None


def write(path, config: GPTConfig, state: dict, pos_table=None) -> None:
    """Write config.json + model.safetensors in HF GPT-2 layout (tied head stored once) from a
    model's ``config`` and state dict; ``pos_table``: a sinusoidal model's fixed position
    table, exported as HF's learned ``wpe`` (HF has no other kind)."""
    if any(key.endswith("weight_int8") for key in state):
        raise ValueError("save_pretrained: the model is quantized; HF GPT-2 cannot hold int8 weights: "
                         "save it with gptfast.quantization.save_quantized(model, path)")
    path = make_output_dir(path, "save_pretrained")
    hf_state = {}
    for key, tensor in state.items():
        if key == "lm_head.weight":
            continue
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        hf_state[key] = tensor.detach().to("cpu").contiguous()
    if pos_table is not None:
        hf_state["transformer.wpe.weight"] = pos_table.detach().to("cpu", hf_state["transformer.wte.weight"].dtype).contiguous()
    write_safetensors(path, hf_state)
    write_config(path, config_to_hf(config))
