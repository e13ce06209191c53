"""The checks more than one op (and the model) make, each written once.

- ``host_readable(t)``: whether a check may read ``t``'s values, i.e. ``t`` is a CPU tensor
  and nothing is being compiled. Reading a CUDA tensor blocks the host until the device
  catches up (and cannot run inside a captured CUDA graph); reading any tensor inside
  ``torch.compile`` breaks the graph. So shapes, dtypes and devices are always checked,
  values only where this says so; out-of-range values on CUDA meet torch's device-side
  asserts or the kernels' clamps instead, and ``gptfast.generate`` bounds what it feeds
  the model on the host.
- ``check_ids``: integer ids (token ids, targets) inside a vocabulary.
- ``check_positions``: query positions inside the keys (or the KV cache) and consecutive
  along each row: ``causal_attention``'s ``q_positions`` and the model's ``input_pos``.
- ``validate_key_start`` and ``validate_heads``: per-row key ranges and grouped-query head
  counts, for ``causal_attention`` and ``decode_attention`` alike.
- ``resolve_scale``: an attention softmax scale, a finite positive number (None: 1/sqrt(D)).
- ``describe``: a value as an error message names it.
"""
import math
import numbers

import torch
from torch import Tensor


def host_readable(t: Tensor) -> bool:
    """Whether checking ``t``'s values costs no device sync and no graph break: a CPU
    tensor, outside ``torch.compile``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_ids(what: str, ids: Tensor, vocab_size: int, ignore=None) -> None:
    """Raise naming the first id of the (rows, positions) tensor ``ids`` outside
    [0, vocab_size) (``ignore`` allowed), with its row and position. Values are read only
    where ``host_readable`` says so."""
    if not host_readable(ids):
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        allowed = f" (or {ignore})" if ignore is not None else ""
        raise ValueError(f"{what} {int(ids[row, col])} at row {row}, position {col} is outside the vocabulary: "
                         f"ids must be in [0, {vocab_size}){allowed}")


def check_positions(what: str, positions: Tensor, limit: int, space: str) -> None:
    """Positions (one row (T,) or one row per batch row (B, T)) must lie in [0, limit) (the
    ``space``: "keys", "positions of the KV cache") and be consecutive along each row.
    Values are read only where ``host_readable`` says so."""
    if not host_readable(positions):
        return
    if bool(((positions < 0) | (positions >= limit)).any()):
        raise ValueError(f"{what} {positions.tolist()} outside the {limit} {space} (context overflow)")
    if bool((positions.diff(dim=-1) != 1).any()):
        raise ValueError(f"{what} {positions.tolist()} must be consecutive (p, p+1, ..., along each row)")


def validate_key_start(name: str, key_start, q: Tensor) -> None:
    """``key_start``: a (B,) int32/int64 tensor on q's device (its values are never read on
    the host: they may be anything; negative starts count as 0)."""
    if not isinstance(key_start, Tensor):
        raise TypeError(f"{name}: key_start must be a torch.Tensor, got {type(key_start).__name__}")
    if key_start.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: key_start must be int32 or int64, got {key_start.dtype}")
    if tuple(key_start.shape) != (q.shape[0],):
        raise ValueError(f"{name}: key_start must have shape ({q.shape[0]},) (one start per batch row), "
                         f"got {tuple(key_start.shape)}")
    if key_start.device != q.device:
        raise ValueError(f"{name}: key_start is on {key_start.device} but q is on {q.device}")


def validate_heads(name: str, heads: int, kv_heads: int, kv_name: str = "k") -> None:
    """Grouped-query attention: the kv head count must divide the query head count."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{name}: {kv_name} has {kv_heads} heads, which must divide the {heads} query heads "
                         "(grouped-query attention: query head h reads kv head h // (H // H_kv))")


def resolve_scale(name: str, scale, head_dim: int) -> float:
    """The softmax scale as a float: ``1/sqrt(head_dim)`` for None, else ``scale``, which
    must be a finite number > 0 (a NaN or infinite scale makes every output NaN; a string
    or a tensor is a mistake, not a scale)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: scale must be a number, got {describe(scale)}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: scale must be a finite number > 0, got {scale!r}")
    return float(scale)
