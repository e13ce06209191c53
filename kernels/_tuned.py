"""Tuned configuration tables: per-device launch configs measured by ``python -m gptfast.tune``.

A table is a JSON file in ``kernels/tuned/`` (``TUNED_DIR``)::

    {
      "format": 1,
      "device": {"name": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0"},
      "configs": {
        "causal_attention.fwd": {"d64_16bit": {"num_warps": 8, "num_stages": 3, "block_m": 128, "block_n": 128}},
        "layer_norm.bwd": {"n1024_16bit": {"num_warps": 4, "num_stages": 1}}
      },
      "results": [...]   # what gptfast.tune measured per candidate (read by people, not here)
    }

``configs`` maps a kernel name (``<module>.<kernel>``, see each module's ``TUNABLE``) and
a shape key (the kernel module's ``tuning_key``) to ``LaunchConfig`` fields. The launchers
call ``pick(kernel, key, builtin, device)``: the table whose ``device`` equals the CUDA
device's name, compute capability and the running triton version supplies the config
when it has one for that key; otherwise the built-in one is used. Off CUDA nothing is
read. Every table in the directory is validated when the first lookup reads them (and
``gptfast.tune --install`` validates the same way): a malformed file raises
``TunedTableError`` naming the file and the entry (a committed table that cannot be read
must not be ignored silently), as do an unknown kernel name (never read by a launcher),
an entry lacking a field its kernel needs or carrying one it has no use for (see
``kernel_schema``), and two tables for the same device.
"""
import functools
import json
import os
import re
from typing import Optional

import torch

from ._common import LaunchConfig, cuda_index

FORMAT = 1
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


class TunedTableError(ValueError):
    """A tuned configuration table cannot be used (the message names the file)."""


def device_identity(device: torch.device) -> Optional[dict]:
    """``{"name", "capability", "triton"}`` of a CUDA device (what tables are keyed by);
    None off CUDA (or where CUDA is not available)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    import triton

    index = cuda_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": [major, minor], "triton": triton.__version__}


def table_file_name(identity: dict) -> str:
    """The file name a table for ``identity`` is committed under, e.g.
    ``nvidia-h200_sm90_triton3.6.0.json``."""
    slug = re.sub(r"[^a-z0-9]+", "-", identity["name"].lower()).strip("-") or "device"
    major, minor = identity["capability"]
    return f"{slug}_sm{major}{minor}_triton{identity['triton']}.json"


def _validate(table, path: str) -> dict:
    def fail(why):
        raise TunedTableError(f"tuned configuration table {path}: {why}")

    if not isinstance(table, dict):
        fail("the top level must be a JSON object")
    if table.get("format") != FORMAT:
        fail(f"format must be {FORMAT}, got {table.get('format')!r}")
    device = table.get("device")
    if (not isinstance(device, dict) or not isinstance(device.get("name"), str)
            or not isinstance(device.get("triton"), str) or not isinstance(device.get("capability"), list)
            or len(device["capability"]) != 2 or not all(isinstance(c, int) for c in device["capability"])):
        fail('"device" must be {"name": str, "capability": [major, minor], "triton": str}, '
             f"got {device!r}")
    configs = table.get("configs")
    if not isinstance(configs, dict):
        fail('"configs" must be an object of kernel name -> {shape key -> launch config}')
    parsed = {}
    schema = kernel_schema()
    for kernel, by_key in configs.items():
        if kernel not in schema:
            fail(f'configs["{kernel}"]: unknown kernel {kernel!r} (a launcher would never read it); '
                 f"known: {', '.join(sorted(schema))}")
        if not isinstance(by_key, dict):
            fail(f'configs["{kernel}"] must be an object of shape key -> launch config')
        required, allowed, variants = schema[kernel]
        for key, fields in by_key.items():
            try:
                cfg = LaunchConfig.from_dict(fields)
            except (TypeError, ValueError) as e:
                fail(f'configs["{kernel}"]["{key}"]: {e}')
            missing, extra = sorted(required - set(fields)), sorted(set(fields) - allowed)
            if missing or extra:
                fail(f'configs["{kernel}"]["{key}"] = {fields}: {kernel} needs the fields {sorted(required)}'
                     + (f"; missing {missing}" if missing else "") + (f"; no use for {extra}" if extra else ""))
            if cfg.variant not in variants:
                fail(f'configs["{kernel}"]["{key}"]: variant {cfg.variant!r} is not one of {kernel}\'s '
                     f"{sorted(v for v in variants if v)}")
            parsed[(kernel, key)] = cfg
    return {"device": device, "configs": parsed, "path": path}


# Fields a launcher fills in itself when a config leaves them out (``cfg.block_rows or 1``),
# though every tuning candidate sets them: allowed in a table, never required.
LAUNCHER_DEFAULTS = {"layer_norm.bwd": {"block_rows"}}


@functools.lru_cache(maxsize=None)
def kernel_schema() -> dict:
    """``{kernel name: (required fields, allowed fields, allowed variants)}`` of every
    tunable kernel, from each kernel module's ``CANDIDATES`` (``<module>.<kernel>``): a
    field every candidate sets and that has no default (in ``LaunchConfig`` or in
    ``LAUNCHER_DEFAULTS``) is required, one some candidate sets or a launcher defaults is
    allowed, and so is a variant some candidate names (None: the plain kernel). Imports the kernel modules (and so triton) on first use."""
    import importlib

    from ._registry import KERNEL_MODULES

    schema = {}
    for module in KERNEL_MODULES:
        candidates = getattr(importlib.import_module(f"{__package__}.{module}"), "CANDIDATES", {})
        for kind, by_key in candidates.items():
            sets = [set(cfg.to_dict()) for configs in by_key.values() for cfg in configs]
            defaults = set(LaunchConfig(num_warps=1).to_dict()) - {"num_warps"}
            variants = {cfg.variant for configs in by_key.values() for cfg in configs} | {None}
            name = f"{module}.{kind}"
            defaulted = defaults | LAUNCHER_DEFAULTS.get(name, set())
            schema[name] = (set.intersection(*sets) - defaulted, set.union(*sets) | defaulted, variants)
    return schema


def read_table(path: str) -> dict:
    """Read and validate one table: ``{"device", "configs": {(kernel, key): LaunchConfig}, "path"}``."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise TunedTableError(f"tuned configuration table {path}: cannot be read as JSON ({e})") from e
    return _validate(table, path)


def load_tables(directory: Optional[str] = None) -> tuple:
    """Every table in ``directory`` (default ``TUNED_DIR``), validated, sorted by file name;
    read once per directory."""
    return _load_tables(directory or TUNED_DIR)


@functools.lru_cache(maxsize=None)
def _load_tables(directory: str) -> tuple:
    if not os.path.isdir(directory):
        return ()
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    return tuple(read_table(os.path.join(directory, n)) for n in names)


def find_table(identity: Optional[dict], directory: Optional[str] = None) -> Optional[dict]:
    """The table for ``identity`` in ``directory`` (default ``TUNED_DIR``), or None."""
    if identity is None:
        return None
    matches = [t for t in load_tables(directory) if t["device"] == identity]
    if len(matches) > 1:
        raise TunedTableError(f"tuned configuration tables {', '.join(t['path'] for t in matches)} are all "
                              f"for {identity}: keep one")
    return matches[0] if matches else None


def tuned_config(kernel: str, key: str, device: torch.device) -> Optional[LaunchConfig]:
    """The tuned config of ``kernel`` at shape ``key`` for ``device``, or None."""
    table = find_table(device_identity(device))
    return None if table is None else table["configs"].get((kernel, key))


_picked = {}


def pick(kernel: str, key: str, builtin: LaunchConfig, device: torch.device) -> LaunchConfig:
    """The launch config: the device's tuned one when its table has it, else ``builtin``.

    Cached per (kernel, key, builtin, device, tables directory): asking the device for its
    identity costs microseconds, paid on every launch otherwise."""
    index = device.index
    if index is None and device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()  # a bare "cuda" is the current device
    where = (device.type, index)
    cache_key = (kernel, key, builtin, where, TUNED_DIR, device_identity)
    config = _picked.get(cache_key)
    if config is None:
        config = _picked[cache_key] = tuned_config(kernel, key, device) or builtin
    return config


def table_json(identity: dict, configs: dict, results: list) -> dict:
    """A table as JSON, from ``configs`` ``{(kernel, key): LaunchConfig}``; ``_validate``
    accepts what this returns."""
    nested = {}
    for (kernel, key), cfg in sorted(configs.items()):
        nested.setdefault(kernel, {})[key] = cfg.to_dict()
    return {"format": FORMAT, "device": dict(identity), "configs": nested, "results": list(results)}
