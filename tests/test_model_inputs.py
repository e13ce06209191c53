"""Bad input to the config, the model, its KV cache and checkpoint loading: a clear
exception naming the argument and value, never a silent result (issue 12's model cases
and their siblings)."""
import dataclasses
import json
import math
import struct
import warnings

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.backends import BACKENDS
from gptfast.checkpoints.hf_gpt2 import CheckpointError
from gptfast.ops._dispatch import use_triton

TINY = dict(vocab_size=53, block_size=32, n_layer=2, n_head=2, n_embd=32)
INT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner")
ALL = [pytest.param(b, marks=pytest.mark.skipif(b == "fused" and not use_triton(torch.empty(0)),
                                                reason="needs TRITON_INTERPRET=1")) for b in BACKENDS]


def tiny(backend="torch", **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}), backend=backend).eval()


# ---- GPTConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-1e-5, math.nan, math.inf, "1e-5", True])
def test_config_rejects_bad_layer_norm_epsilon(eps):
    with pytest.raises(ValueError, match=r"layer_norm_epsilon.*" + repr(eps).replace("(", r"\(")[:4]):
        GPTConfig(**TINY, layer_norm_epsilon=eps)


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 2.0, "4"])
def test_config_rejects_bools_and_non_ints_in_int_fields(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field} must be a positive integer.*got {value!r}"):
        GPTConfig(**{**TINY, field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
def test_config_rejects_negative_and_zero_sizes(field):
    for value in (-5, 0):
        with pytest.raises(ValueError, match=rf"GPTConfig\.{field} .*got {value}"):
            GPTConfig(**{**TINY, field: value})


@pytest.mark.parametrize("field,value", [("dropout", True), ("dropout", math.nan), ("dropout", "0.1"),
                                         ("bias", 1), ("pos_embedding", ["learned"])])
def test_config_rejects_other_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}"):
        GPTConfig(**{**TINY, field: value})


def test_config_from_dict_needs_a_dict():
    with pytest.raises(ValueError, match="takes a dict, got list"):
        GPTConfig.from_dict([1, 2])
    assert GPTConfig.from_dict(dataclasses.asdict(GPTConfig(**TINY))) == GPTConfig(**TINY)


# ---- checkpoints (from_pretrained) ---------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("key,value,names", [
    ("layer_norm_epsilon", -1e-5, "layer_norm_epsilon"),
    ("layer_norm_epsilon", math.nan, "layer_norm_epsilon"),
    ("n_inner", -5, "n_inner"),
    ("n_layer", True, "n_layer"),
    ("n_positions", 0, "n_positions"),
])
def test_config_json_values_are_checked_and_named(saved, key, value, names):
    path, _ = saved
    _edit_config(path, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json.*{names}"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"gpt2"'])
def test_config_json_that_is_not_an_object(saved, content):
    path, _ = saved
    (path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config\.json.*JSON object"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("content,match", [("[]", "JSON object"), ("null", "JSON object"),
                                           ('{"weight_map": null}', "weight_map"),
                                           ('{"weight_map": {"a": "../x.safetensors"}}', "shard file name")])
def test_index_json_that_is_not_a_weight_map(saved, content, match):
    path, _ = saved
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json.*{match}"):
        GPT.from_pretrained(path)


def test_from_pretrained_on_a_file_says_it_is_a_file(saved):
    path, _ = saved
    with pytest.raises(NotADirectoryError, match=r"model\.safetensors' is a file, not a checkpoint directory"):
        GPT.from_pretrained(path / "model.safetensors")


def _poison_tensor(file, name, value=b"\xff\xff\xff\xff"):
    """Overwrite the first element's bytes of tensor ``name`` inside a safetensors file."""
    data = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    start = 8 + header_len + header[name]["data_offsets"][0]
    data[start:start + len(value)] = value
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [b"\xff\xff\xff\xff", struct.pack("<f", math.inf)])
def test_non_finite_weights_in_a_checkpoint_are_named(saved, value):
    path, _ = saved
    _poison_tensor(path / "model.safetensors", "transformer.h.1.mlp.c_fc.weight", value)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*non-finite"):
        GPT.from_pretrained(path)


# ---- the forward: ids, targets, loss -------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [-1, 53, 1000])
def test_token_ids_outside_the_vocabulary(backend, bad):
    model = tiny(backend)
    idx = torch.randint(0, 53, (2, 6))
    idx[1, 4] = bad
    pattern = rf"token id {bad} at row 1, position 4 .*\[0, 53\)"
    with pytest.raises(ValueError, match=pattern):
        model(idx)
    model.setup_cache(2, 16)
    with pytest.raises(ValueError, match=pattern):
        model(idx, input_pos=torch.arange(6))
    model(idx.clamp(0, 52), input_pos=torch.arange(6))
    with pytest.raises(ValueError, match=rf"token id {bad} at row 0, position 0"):
        model(torch.tensor([[bad], [3]]), input_pos=torch.tensor([[6], [6]]))


def test_targets_are_checked():
    model = tiny()
    idx = torch.randint(0, 53, (2, 10))
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 10\), got \(2, 9\)"):
        model(idx, idx[:, :9])
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 10\), got \(20,\)"):
        model(idx, idx.reshape(-1))
    with pytest.raises(TypeError, match="targets must be an integer tensor.*float32"):
        model(idx, idx.float())
    bad = idx.clone()
    bad[0, 7] = 99
    with pytest.raises(ValueError, match=r"target 99 at row 0, position 7 .*\[0, 53\) \(or -100\)"):
        model(idx, bad)
    _, loss32 = model(idx, idx.int())
    _, loss64 = model(idx, idx)
    torch.testing.assert_close(loss32, loss64)


def test_all_ignored_targets_give_zero_loss_with_a_warning():
    model = tiny().train()
    idx = torch.randint(0, 53, (2, 8))
    with pytest.warns(RuntimeWarning, match="every target is -100"):
        _, loss = model(idx, torch.full((2, 8), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one counted target: a plain mean, no warning
        targets = torch.full((2, 8), -100)
        targets[1, 3] = 5
        logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[1, 3], torch.tensor(5)))


def test_non_tensor_inputs_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="idx must be a .* got list"):
        model([[1, 2, 3]])
    model.setup_cache(1, 8)
    with pytest.raises(TypeError, match="input_pos must be an integer tensor, got list"):
        model(torch.tensor([[1, 2]]), input_pos=[0, 1])
    with pytest.raises(ValueError, match=r"logits_index must be a \(1,\) integer tensor, got list"):
        model(torch.tensor([[1, 2]]), logits_index=[1])


# ---- the KV cache --------------------------------------------------------------------------


@pytest.mark.parametrize("args,name", [((1.5, 8), "max_batch"), (("2", 8), "max_batch"), ((True, 8), "max_batch"),
                                       ((0, 8), "max_batch"), ((2, 8.0), "max_seq_len"), ((2, "8"), "max_seq_len"),
                                       ((2, -1), "max_seq_len")])
def test_setup_cache_rejects_bad_sizes(args, name):
    with pytest.raises(ValueError, match=rf"setup_cache: {name} must be an int >= 1, got {args[name == 'max_seq_len']!r}"):
        tiny().setup_cache(*args)


def test_setup_cache_rejects_another_dtype_or_device():
    model = tiny()
    with pytest.raises(TypeError, match=r"cache dtype torch\.float16 differs from the model's dtype torch\.float32"):
        model.setup_cache(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache device meta differs"):
        model.setup_cache(2, 8, device="meta")
    model.setup_cache(2, 8, device="cpu", dtype=torch.float32)
    assert model.kv_cache.k.dtype == torch.float32


def test_decode_with_nothing_prefilled_raises():
    model = tiny()
    model.setup_cache(3, 16)
    with pytest.raises(RuntimeError, match="decode step of 2 rows, but a prefill wrote only 0 rows"):
        model(torch.tensor([[1], [2]]), input_pos=torch.tensor([[0], [0]]))
    model(torch.tensor([[1, 2, 3]]), input_pos=torch.arange(3))  # row 0 only
    with pytest.raises(RuntimeError, match="decode step of 2 rows, but a prefill wrote only 1 rows"):
        model(torch.tensor([[1], [2]]), input_pos=torch.tensor([[3], [3]]))
    assert torch.isfinite(model(torch.tensor([[4]]), input_pos=torch.tensor([[3]]))).all()
    model.setup_cache(3, 16)  # a fresh cache holds nothing again
    with pytest.raises(RuntimeError, match="prefill"):
        model(torch.tensor([[1]]), input_pos=torch.tensor([[0]]))
