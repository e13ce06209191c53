"""gptfast inside Hugging Face transformers models: ``attn_implementation="gptfast"``.

Importing this module registers ``"gptfast"`` with transformers' ``AttentionInterface``
(the attention function) and ``AttentionMaskInterface`` (its mask function), so any model
that dispatches attention through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, the Llama family,
Mistral, Qwen, ...) can run gptfast's kernels::

    import gptfast.integrations.hf  # registers "gptfast"
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="gptfast")
    # or, in place, also swapping every nn.LayerNorm for gptfast.nn.LayerNorm:
    apply_gptfast(model); ...; unapply_gptfast(model)

What runs where:

- training and prefill (several queries, or gradients needed): ``gptfast.ops.causal_attention``
  with ``q_offset`` = cached length, grouped-query K/V read in place (no ``repeat_kv``);
- one-token decode steps without gradients: ``gptfast.ops.decode_attention`` over the cache
  (DynamicCache or StaticCache);
- a left-padded batch: the 2-D padding mask becomes ``key_start`` (each row's first
  unmasked key, computed on the device). Padded queries output 0 (eager gives them
  arbitrary values; no real token ever attends to them). With a StaticCache the mask's
  length is the valid key length: keys past it (the unwritten cache) are not read.

Everything the kernels cannot express falls back to transformers' own SDPA attention, with
one warning per model and reason, never a wrong result: a 4-D or non-boolean mask, a 2-D
mask that is not left padding (checked on the host, so under ``torch.compile`` any
non-trivial mask falls back), extra mask functions (sliding windows, chunked or packed
attention: the mask function then builds SDPA's 4-D mask), soft-capping, attention sinks
or position biases, dropout > 0 in training, ``output_attentions``, a non-causal module,
and dtypes or head sizes the kernels do not take. The fallback computes exactly what the
``"sdpa"`` implementation computes for the same inputs (a 2-D mask becomes SDPA's 4-D mask,
nonzero = seen, as transformers reads it). A 2-D mask that fits no sequence (not one
column per token seen) raises ValueError, from the mask function and from the attention
function alike: no attention implementation can give it a meaning.

Per-call host cost. The attention function runs once per layer, with the same mask
tensor every time within one forward: what depends on the mask alone (is it left padding,
a host read; each row's first key, a device op) is computed for the first layer and
reused by the others (``_mask_facts``, keyed by the mask tensor's identity and version).
The decode step's per-row lengths are likewise made once per (batch, length, device).
"""
import warnings
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from gptfast import nn as gnn
from gptfast import ops
from gptfast.ops.causal_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES

NAME = "gptfast"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")
# id(model config) -> the fallback reasons already warned about (configs are unhashable;
# an entry goes when its config is collected).
_warned = {}


def gptfast_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                 attention_mask=None, **kwargs):
    """The mask function of ``"gptfast"`` (as transformers' ``flash_attention_mask``): None
    for plain causal attention, else the boolean (B, valid keys) 2-D padding mask (all True
    for a StaticCache without padding: its length tells the valid keys). A mask
    pattern other than causal-plus-padding (sliding window, packed sequences, extra mask
    functions) gets SDPA's full 4-D mask, which the attention function hands to SDPA."""
    if mask_function is not causal_mask_function or kv_offset != 0:
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         **kwargs)
    if attention_mask is None:  # with a StaticCache the keys past q_offset + q_length are not written yet
        valid = q_offset + q_length
        return None if valid == kv_length else torch.ones(batch_size, valid, dtype=torch.bool,
                                                            device=kwargs.get("device"))
    if attention_mask.dim() == 2:
        _check_mask_length(attention_mask, q_offset, q_length)
        attention_mask = attention_mask.bool()
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


def _mask_misfit(attention_mask, q_length: int, seen: int | None, keys: int):
    """A ValueError for a 2-D padding mask that fits no sequence (it must have one column per
    token seen: ``seen`` when known, else between the query and key counts), or None."""
    length = attention_mask.shape[1]
    fits = length == seen if seen is not None else q_length <= length <= keys
    if fits:
        return None
    want = f"{seen}" if seen is not None else f"{q_length} to {keys}"
    return ValueError(f"gptfast attention: attention_mask of shape {tuple(attention_mask.shape)} fits no sequence: "
                      f"a 2-D padding mask needs one column per token seen ({want}) for {q_length} new tokens")


def _check_mask_length(attention_mask, q_offset, q_length: int) -> None:
    """Raise the ``_mask_misfit`` error for a 2-D mask whose length is not the number of tokens
    seen (``q_offset`` cached + ``q_length`` new); a tensor offset (a StaticCache) is read on
    the host except under ``torch.compile``."""
    if isinstance(q_offset, torch.Tensor):
        if torch.compiler.is_compiling():
            return
        q_offset = int(q_offset)
    error = _mask_misfit(attention_mask, q_length, q_offset + q_length, 0)
    if error is not None:
        raise error


def _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs):
    """Why the kernels cannot serve this call (None when they can)."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions needs the attention weights"
    if dropout > 0 and module.training:
        return f"attention dropout {dropout} in training"
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return "non-causal attention"
    if query.dtype not in SUPPORTED_DTYPES or query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] != query.shape[-1]:
        return f"dtype {query.dtype} / head size {query.shape[-1]}"
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        error = _mask_misfit(attention_mask, query.shape[2], None, key.shape[2])
        if error is not None:
            raise error
    if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
        return f"a {attention_mask.dim()}-D {attention_mask.dtype} attention mask"
    if torch.compiler.is_compiling():
        return "a padding mask under torch.compile (checking its pattern needs a host read)"
    left_padding, _ = _mask_facts(attention_mask)
    return None if left_padding else "a padding mask that is not left padding"


# The last mask seen: (weak reference, version, is it left padding, each row's first key).
_last_mask = [None]


def _mask_facts(attention_mask):
    """(whether the 2-D boolean mask is left padding, each row's first key on the device),
    computed once per mask tensor (every layer of a forward passes the same one) and again
    whenever that tensor is modified in place."""
    cached = _last_mask[0]
    if cached is not None and cached[0]() is attention_mask and cached[1] == attention_mask._version:
        return cached[2], cached[3]
    first = _first_key(attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    left_padding = torch.equal(attention_mask, positions[None, :] >= first[:, None])
    _last_mask[0] = (weakref.ref(attention_mask), attention_mask._version, left_padding, first)
    return left_padding, first


# The last decode lengths made: ((batch, length, device), lens); never written after.
_last_lens = [None]


def _decode_lens(batch: int, valid: int, device):
    """A (batch,) int32 tensor of ``valid``, made once per (batch, valid, device)."""
    key = (batch, valid, device)
    cached = _last_lens[0]
    if cached is not None and cached[0] == key:
        return cached[1]
    lens = torch.full((batch,), valid, dtype=torch.int32, device=device)
    _last_lens[0] = (key, lens)
    return lens


def _sdpa_padding_mask(attention_mask, q_len: int, kv_len: int):
    """The 4-D mask transformers' ``sdpa`` implementation would get for this 2-D padding mask
    (keys past the mask, the unwritten rest of a StaticCache, hidden)."""
    valid = attention_mask.shape[1]
    padded = torch.nn.functional.pad(attention_mask, (0, kv_len - valid), value=False)
    return sdpa_mask(attention_mask.shape[0], q_len, kv_len, q_offset=valid - q_len, attention_mask=padded,
                     allow_is_causal_skip=False, device=attention_mask.device)


def _first_key(attention_mask):
    """(B,) index of each row's first True (its left padding's length), on the device."""
    return attention_mask.to(torch.int32).argmax(dim=1)


def _warn_once(module, reason: str) -> None:
    config = getattr(module, "config", module)
    if id(config) not in _warned:
        _warned[id(config)] = set()
        weakref.finalize(config, _warned.pop, id(config), None)
    seen = _warned[id(config)]
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"gptfast attention: {reason}; this call runs transformers' SDPA attention instead",
                      stacklevel=3)


def gptfast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: query (B, H, Tq, D), key/value
    (B, H_kv, Tk, D) after the cache update; returns ((B, Tq, H, D), None)."""
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_once(module, reason)
        if attention_mask is not None and attention_mask.dim() == 2:  # as transformers reads a 2-D mask: nonzero = seen
            attention_mask = _sdpa_padding_mask(attention_mask.bool(), query.shape[2], key.shape[2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q_len = query.shape[2]
    valid = key.shape[2] if attention_mask is None else attention_mask.shape[1]
    key_start = None if attention_mask is None else _mask_facts(attention_mask)[1]
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if q_len == 1 and not needs_grad:
        if torch.compiler.is_compiling():
            lens = torch.full((query.shape[0],), valid, dtype=torch.int32, device=query.device)
        else:
            lens = _decode_lens(query.shape[0], valid, query.device)
        out = ops.decode_attention(query[:, :, 0], key, value, lens, scale=scaling, key_start=key_start)
        out = out.unsqueeze(2)
    else:
        out = ops.causal_attention(query, key[:, :, :valid], value[:, :, :valid], scale=scaling,
                                   q_offset=valid - q_len, key_start=key_start)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gptfast_attention_forward)
AttentionMaskInterface.register(NAME, gptfast_mask)


# ----------------------------------------------------------------------------- apply / unapply


def _swap_layer_norms(model: nn.Module) -> dict:
    """Replace every ``nn.LayerNorm`` by a ``gptfast.nn.LayerNorm`` holding the same
    parameters (same state-dict keys; optimizers keep working); returns {name: original}."""
    originals = {}
    for name, old in list(model.named_modules()):
        if type(old) is not nn.LayerNorm:
            continue
        new = gnn.LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                            bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        originals[name] = old
    return originals


def apply_gptfast(model: nn.Module) -> nn.Module:
    """In place: run ``model``'s attention through gptfast (``set_attn_implementation("gptfast")``)
    and its ``nn.LayerNorm`` modules through ``gptfast.nn.LayerNorm``. Returns the model;
    ``unapply_gptfast(model)`` restores it."""
    if hasattr(model, "_gptfast_originals"):
        return model
    if not (isinstance(model, nn.Module) and hasattr(model, "set_attn_implementation")
            and hasattr(getattr(model, "config", None), "_attn_implementation")):
        kind = f"a gptfast {type(model).__name__}" if type(model).__module__.startswith("gptfast") else type(model).__name__
        raise TypeError(f"apply_gptfast: model must be a transformers PreTrainedModel (one with "
                        f"set_attn_implementation), got {kind}; a gptfast GPT runs gptfast's kernels already")
    attn = model.config._attn_implementation
    model._gptfast_originals = {"attn_implementation": attn, "modules": _swap_layer_norms(model)}
    model.set_attn_implementation(NAME)
    return model


def unapply_gptfast(model: nn.Module) -> nn.Module:
    """Undo ``apply_gptfast``: the original LayerNorm modules and attention implementation."""
    record = model.__dict__.pop("_gptfast_originals", None)
    if record is None:
        raise ValueError("unapply_gptfast: this model was not patched by apply_gptfast")
    for name, old in record["modules"].items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, old)
    model.set_attn_implementation(record["attn_implementation"])
    return model
