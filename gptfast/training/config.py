"""TrainConfig: every setting of a training run, its presets, and config-file loading.

Settings are layered, later ones winning: the dataclass defaults, a preset
(``TRAIN_PRESETS``), a TOML/YAML config file with the same keys, then explicit
command-line flags. ``gptfast train --help`` lists every key with its help text.
"""
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from gptfast.backends import BACKENDS
from gptfast.config import PRESETS as MODEL_PRESETS
from gptfast.runtime.devices import check_device_name
from gptfast.training.precision import AUTOCAST_SETTINGS

DTYPES = AUTOCAST_SETTINGS
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile backends --compile-backend takes
SEED_LIMIT = 2**31  # numpy seeds must be < 2**32; each rank adds its rank, each evaluation its step


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: finite, from ``low`` to ``high``, each bound
    included unless ``*_open``."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    text: str = ""  # replaces the generated description
    note: str = ""  # what a boundary value means

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.text:
            return self.text
        if math.isinf(self.high):
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_COUNT = Range(1)  # sizes and step counts
_STEPS = Range(0)  # intervals where 0 means "off" / "only at the end"
_PROBABILITY = Range(0, 1, high_open=True)

# Every numeric setting and what it accepts (checked for every TrainConfig, whatever built it).
RANGES = {
    "val_fraction": Range(0, 1, low_open=True, high_open=True),
    "corpus_max_bytes": _STEPS,
    "n_layer": _COUNT, "n_head": _COUNT, "n_embd": _COUNT, "vocab_size": _COUNT, "block_size": _COUNT,
    "dropout": _PROBABILITY,
    "batch_size": _COUNT, "grad_accum": _COUNT, "max_steps": _COUNT,
    "lr": Range(0, low_open=True, text="a positive number"),
    "min_lr": Range(0),
    "warmup_steps": _STEPS,
    "lr_decay_steps": _COUNT,
    "weight_decay": Range(0),
    "beta1": _PROBABILITY, "beta2": _PROBABILITY,
    "grad_clip": Range(0, note="0: off"),
    "seed": Range(0, SEED_LIMIT, high_open=True),
    "log_interval": _COUNT, "eval_interval": _STEPS, "eval_batches": _COUNT, "ckpt_interval": _STEPS,
    "sample_tokens": _COUNT,
    "sample_temperature": Range(0, note="0: greedy"),
    "sample_top_k": _COUNT,
}


def flag_name(name: str) -> str:
    """The command-line flag of a setting (``grad_clip`` -> ``--grad-clip``)."""
    return "--" + name.replace("_", "-")


def _flag_hint(name: str) -> str:
    return f" ({flag_name(name)})"


def check_setting(name: str, value, allowed: Range):
    """Raise ValueError naming ``name`` and its flag unless ``value`` is None or in ``allowed``
    (NaN and infinities never are); returns ``value``."""
    if value is not None and value not in allowed:
        kind = "a finite number " if not (allowed.text or math.isfinite(value)) else ""
        raise ValueError(f"{name} must be {kind}{allowed.describe()}, got {value!r}{_flag_hint(name)}")
    return value


def _f(default, help, **kw):
    """A dataclass field with help text (shown by ``gptfast train --help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---- data -------------------------------------------------------------------
    data: Optional[str] = _f(None, "text file, folder, or JSONL ({'text'} for pretraining; {'prompt','completion'} or "
                                   "{'messages'} for fine-tuning); default: the Python standard library's sources")
    finetune: Optional[bool] = _f(None, "treat the data as fine-tuning examples (default: detect from the JSONL)")
    tokenizer: Optional[str] = _f(None, "tokenizer.json or a directory with it (default: the --init model's, else bytes)")
    val_fraction: float = _f(0.05, "fraction of the data held out for validation")
    corpus_max_bytes: Optional[int] = _f(2_000_000, "size cap of the embedded standard-library corpus (0: no cap)")
    cache_dir: Optional[str] = _f(None, "token cache directory (default: $GPTFAST_CACHE_DIR/tokens or ~/.cache/gptfast/tokens)")
    # ---- model ------------------------------------------------------------------
    model: str = _f("tiny", f"model preset for a model trained from scratch: {sorted(MODEL_PRESETS)}")
    init: Optional[str] = _f(None, "start from this local model: a HF GPT-2 directory or a gptfast run directory")
    n_layer: Optional[int] = _f(None, "override the preset's number of layers")
    n_head: Optional[int] = _f(None, "override the preset's number of heads")
    n_embd: Optional[int] = _f(None, "override the preset's embedding width")
    vocab_size: Optional[int] = _f(None, "model vocabulary (default: the tokenizer's)")
    dropout: Optional[float] = _f(None, "dropout probability (default: the model's)")
    backend: Optional[str] = _f(None, f"op backend {BACKENDS} (default: fused on CUDA, torch on CPU)")
    # ---- optimisation -----------------------------------------------------------
    block_size: Optional[int] = _f(None, "training context length (default: the model's context)")
    batch_size: int = _f(8, "sequences per micro-batch on each rank")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(500, "optimizer steps in the whole run")
    lr: float = _f(2e-3, "peak learning rate")
    min_lr: Optional[float] = _f(None, "final learning rate of the cosine decay (default: lr / 10)")
    warmup_steps: int = _f(20, "linear warmup steps")
    lr_decay_steps: Optional[int] = _f(None, "step at which the cosine reaches min_lr (default: max_steps)")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases, norms: parameters with ndim < 2)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    # ---- system -----------------------------------------------------------------
    device: str = _f("auto", "auto, cpu or cuda")
    dtype: str = _f("auto", f"compute dtype {DTYPES}: auto is bfloat16 autocast on CUDA, float32 on CPU")
    compile: bool = _f(False, "torch.compile the whole training forward (fullgraph, fused ops inside); the first step compiles")
    compile_backend: str = _f("inductor", "torch.compile backend for --compile (inductor; aot_eager: no C++ build)")
    fsdp: bool = _f(False, "shard the model with FSDP2 (fully_shard) instead of DDP; needs torchrun")
    seed: int = _f(1337, "random seed (model init, data order, dropout)")
    # ---- evaluation, logging, checkpoints ----------------------------------------
    out_dir: str = _f("runs/default", "run directory: checkpoint.pt, HF export, metrics.jsonl", flag="--out")
    resume: bool = _f(False, "continue from <out>/checkpoint.pt")
    overwrite: bool = _f(False, "start afresh even if <out> already holds a checkpoint")
    log_interval: int = _f(10, "log the training loss every N steps")
    eval_interval: int = _f(100, "validation loss, perplexity and samples every N steps (0: only at the end)")
    eval_batches: int = _f(8, "validation batches per evaluation (per rank)")
    ckpt_interval: int = _f(100, "write a checkpoint every N steps (0: only at the end)")
    sample_prompts: List[str] = _f(["def ", "class "], "prompts sampled at each evaluation (empty: no samples)")
    sample_tokens: int = _f(48, "tokens generated per sample")
    sample_temperature: float = _f(0.8, "sampling temperature")
    sample_top_k: Optional[int] = _f(40, "sample from the top-k tokens")
    mfu_peak: str = _f("auto", "MFU denominator: auto (known GPU peak, else measured; n/a on CPU), measured, off, "
                               "or a peak in TFLOPS")
    progress: bool = _f(True, "show a progress bar")
    export: bool = _f(True, "export the final model in Hugging Face format into <out>")

    # ---- construction -----------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return cls.from_dict({**TRAIN_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a mapping with this class's keys (dashes allowed for underscores)."""
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; see `gptfast train --help`")
        return cls(**normalised)  # validated in __post_init__

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check types and ranges (the table ``RANGES`` for every number); raise ValueError
        naming the setting and its command-line flag."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for name, allowed in RANGES.items():
            check_setting(name, getattr(self, name), allowed)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}{_flag_hint('min_lr')}")
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose one of {sorted(MODEL_PRESETS)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}{_flag_hint('backend')}")
        if self.dtype not in DTYPES:
            hint = " (float16 needs loss scaling, which gptfast does not do: use bfloat16)" if self.dtype == "float16" else ""
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}{hint}{_flag_hint('dtype')}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
                             f"{_flag_hint('compile_backend')}")
        check_device_name(self.device, "device (--device)")
        peak_tflops(self.mfu_peak)  # raises on a malformed value
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: choose one")

    @property
    def corpus_cap(self) -> Optional[int]:
        return self.corpus_max_bytes or None

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


def peak_tflops(value: str) -> Optional[float]:
    """The explicit peak in ``mfu_peak`` (a number of TFLOPS), or None for auto/measured/off."""
    if value in ("auto", "measured", "off"):
        return None
    try:
        peak = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"mfu_peak must be auto, measured, off or a number of TFLOPS, got {value!r} (--mfu-peak)") from None
    if not (peak > 0 and math.isfinite(peak)):
        raise ValueError(f"mfu_peak must be a positive, finite number of TFLOPS, got {value!r} (--mfu-peak)")
    return peak


def _coerce(name: str, value, hint):
    """Check ``value`` against the field's annotation; accept ints for floats and numbers for mfu_peak."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be empty{_flag_hint(name)}")
    if typing.get_origin(base) in (list, List):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}{_flag_hint(name)}")
        return list(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}{_flag_hint(name)}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}{_flag_hint(name)}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}{_flag_hint(name)}")
        return float(value)
    if base is str:
        if name == "mfu_peak" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}{_flag_hint(name)}")
        return value
    return value


# Hyper-parameters per preset. The GPT-2 ones follow GPT-3 / llm.c practice (0.5M-token
# batches on one device through grad_accum; divide grad_accum by the number of ranks).
TRAIN_PRESETS = {
    # Seconds on a CPU: a 2-layer byte-level model on 2 MB of the standard library.
    "tiny": dict(model="tiny", block_size=128, batch_size=8, max_steps=500, lr=2e-3, warmup_steps=20,
                 corpus_max_bytes=2_000_000, eval_interval=100, eval_batches=8, ckpt_interval=100),
    # A small code model (6 x 384, byte level) over the whole standard library; minutes on a GPU.
    "small": dict(model="tiny", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, max_steps=5000,
                  lr=1e-3, warmup_steps=100, dropout=0.1, corpus_max_bytes=0, eval_interval=250, eval_batches=20,
                  ckpt_interval=500),
    "gpt2": dict(model="gpt2", block_size=1024, batch_size=16, grad_accum=32, max_steps=10000, lr=6e-4, min_lr=6e-5,
                 warmup_steps=700, corpus_max_bytes=0, eval_interval=250, eval_batches=20, ckpt_interval=1000,
                 sample_tokens=64),
    "gpt2-medium": dict(model="gpt2-medium", block_size=1024, batch_size=8, grad_accum=64, max_steps=10000, lr=3e-4,
                        min_lr=3e-5, warmup_steps=700, corpus_max_bytes=0, eval_interval=250, eval_batches=20,
                        ckpt_interval=1000, sample_tokens=64),
    "gpt2-large": dict(model="gpt2-large", block_size=1024, batch_size=4, grad_accum=128, max_steps=10000, lr=2.5e-4,
                       min_lr=2.5e-5, warmup_steps=700, corpus_max_bytes=0, eval_interval=250, eval_batches=20,
                       ckpt_interval=1000, sample_tokens=64),
    "gpt2-xl": dict(model="gpt2-xl", block_size=1024, batch_size=2, grad_accum=256, max_steps=10000, lr=2e-4,
                    min_lr=2e-5, warmup_steps=700, corpus_max_bytes=0, eval_interval=250, eval_batches=20,
                    ckpt_interval=1000, sample_tokens=64),
    # Fine-tuning a pretrained model (--init DIR --data examples.jsonl): small, constant-ish LR.
    "finetune": dict(lr=3e-5, min_lr=3e-6, warmup_steps=10, max_steps=300, weight_decay=0.0, batch_size=8,
                     eval_interval=50, ckpt_interval=100, sample_prompts=[]),
}


# ---------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------


def load_config_file(path) -> dict:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) mapping of TrainConfig keys
    (``batch-size`` and ``batch_size`` both work; returned with underscores)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:
            try:
                import tomli as tomllib
            except ImportError:
                raise RuntimeError(f"reading {path} needs Python >= 3.11 (tomllib) or the tomli package") from None
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML ({e})") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RuntimeError(f"reading {path} needs PyYAML (pip install pyyaml), or write the config as TOML") from None
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: invalid YAML ({e})") from None
        data = {} if data is None else data
    else:
        raise ValueError(f"config file {path!r} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
