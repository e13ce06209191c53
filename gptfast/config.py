"""GPTConfig: the shape of a GPT-2-family model, with the four GPT-2 presets."""
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

POS_EMBEDDINGS = ("learned", "sinusoidal")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest context the position embeddings cover
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: Optional[int] = None  # MLP hidden size; None means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    pos_embedding: str = "learned"  # "learned" (GPT-2) or "sinusoidal"

    def __post_init__(self):
        """Every field is checked here, where settings enter (bools are not taken as
        numbers: ``block_size=True`` is a mistake, not a block size of 1)."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner"):
            value = getattr(self, name)
            if name == "n_inner" and value is None:
                continue
            if not _is_int(value) or value < 1:
                allowed = " or None" if name == "n_inner" else ""
                raise ValueError(f"GPTConfig.{name} must be a positive integer{allowed}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.pos_embedding, str) or self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"GPTConfig.pos_embedding must be one of {POS_EMBEDDINGS}, got {self.pos_embedding!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not _is_real(self.layer_norm_epsilon) or not (math.isfinite(self.layer_norm_epsilon)
                                                         and self.layer_norm_epsilon >= 0):
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be a finite number >= 0, got {self.layer_norm_epsilon!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"GPTConfig.from_dict takes a dict, got {type(d).__name__} {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small enough for CPU tests and the interpreter; byte-level vocabulary.
    "tiny": dict(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=64),
}
