"""Training checkpoints: everything a resumed run needs to continue bit for bit.

A checkpoint is one file, ``<out_dir>/checkpoint.pt``, holding the model and optimizer
state, the schedule position, every rank's data-sampler state and RNG states (python,
numpy, torch, CUDA), and the configuration it was trained with. It is written to a
temporary file in the same directory, flushed to disk and renamed over the old one
(``os.replace`` is atomic), so a crash mid-write leaves the previous checkpoint intact;
the temp files of writers killed mid-write are removed at the next save (and resume).
It loads with ``torch.load(weights_only=True)``: no pickled code runs on load.

The final weights are exported beside it in Hugging Face GPT-2 format
(``GPT.save_pretrained``, with the tokenizer's files: ``export_tokenizer_files``), so a
run directory doubles as a model directory.
"""
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gptfast.runtime.atomic_files import remove_stale_temp_files, write_atomically

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "gptfast-train-checkpoint"
VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the model or run it is being loaded into."""


def checkpoint_path(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


# ---------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device) -> dict:
    """Python, numpy, torch CPU and (on CUDA) the device generator states, in types
    ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------
# Atomic save and checked load
# ---------------------------------------------------------------------------------------


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically and durably (temp file, fsync, rename, fsync
    the directory), first removing the temp files that killed writers left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, path.name)
    return write_atomically(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f), durable=True)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code...
        raise CheckpointMismatchError(f"{path} is not a readable gptfast checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a gptfast training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointMismatchError(f"{path} has checkpoint version {state.get('version')}, this gptfast reads {VERSION}")
    return state


def check_model_config(saved: dict, current: dict, path) -> None:
    """Raise when the checkpoint's model configuration differs from the one being built."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs requested {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained with a different model configuration ({'; '.join(diffs)}); "
            "use the same model settings, or a different --out directory"
        )


def export_tokenizer_files(tokenizer_path, out_dir) -> None:
    """Copy a BPE tokenizer's files into an exported model directory (the byte tokenizer needs none)."""
    if tokenizer_path is None:
        return
    src = Path(tokenizer_path)
    out_dir = Path(out_dir)
    if src.is_file():
        if src.resolve() != (out_dir / "tokenizer.json").resolve():
            shutil.copyfile(src, out_dir / "tokenizer.json")
        return
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (src / name).exists() and (src / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src / name, out_dir / name)
