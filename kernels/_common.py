"""What every kernel file needs: constants, output allocation, the device guard, the
launch-config type and the builder of static compile entries.

* ``LOG2E``: softmax kernels take scores in base 2 (``exp(x) == exp2(x * LOG2E)``).
* ``sm_count(device)``: streaming multiprocessors of a CUDA device (cached), or
  ``DEFAULT_NUM_SMS`` elsewhere (the interpreter, ahead-of-time planning).
* ``padded_head_dim``: BLOCK_D of the attention kernels.
* ``empty`` / ``check_out``: every output and scratch buffer of a launcher comes from
  here. Inside ``fill_outputs(fill)`` each fresh buffer is passed through ``fill`` first:
  the tests fill them with NaN (``gptfast.testing.poisoned_kernel_outputs``), so a finite
  result proves every element was written.
* ``device_guard``: launches on a tensor's own CUDA device.
* ``LaunchConfig``: tile sizes, warps and pipeline stages of one kernel launch, the one
  shape of every shipped, candidate and tuned configuration.
* ``static_entry`` / ``ast_source``: the entries of a kernel module's
  ``static_configs()`` (how ``gptfast.compile_report`` compiles them for sm_90 on any
  machine), built and consumed in one place.
* ``div`` / ``rsqrt``: Triton helpers with round-to-nearest forms for fp32 (below).
"""
import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DEFAULT_NUM_SMS = 132  # H200 / H100 SXM; used when the device cannot be asked (CPU, interpreter)
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
               torch.int64: "i64"}


# --------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device (the current one for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; DEFAULT_NUM_SMS off CUDA."""
    return _cuda_sm_count(cuda_index(device)) if device.type == "cuda" else DEFAULT_NUM_SMS


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the next power of two >= max(head_dim, 16) (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def device_guard(device: torch.device):
    """Launch on ``device`` (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Output buffers
# --------------------------------------------------------------------------------------

_output_fill: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


@contextlib.contextmanager
def fill_outputs(fill: Callable[[torch.Tensor], torch.Tensor]):
    """Pass every buffer ``empty`` allocates through ``fill`` (in place) while active."""
    global _output_fill
    previous, _output_fill = _output_fill, fill
    try:
        yield
    finally:
        _output_fill = previous


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh output or scratch buffer (filled by ``fill_outputs``' function, if active)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t if _output_fill is None else _output_fill(t)


def check_out(op: str, name: str, t: Optional[torch.Tensor], shape, dtype, device,
              contiguous: bool = False) -> torch.Tensor:
    """Validate a caller-provided output buffer, or allocate one when ``t`` is None.

    A buffer must have exactly ``shape``, ``dtype`` and ``device`` and stride 1 along its
    last dimension (all of it contiguous with ``contiguous``); ValueError otherwise.
    """
    if t is None:
        return empty(shape, dtype, device)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, dtype {dtype} and device {device}; "
                         f"got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous along its last dimension, got strides {t.stride()}")
    if contiguous and t.numel() and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()}")
    return t


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel. Fields a kernel has no use for stay None:
    attention uses block_m (query tile) and block_n (key tile), the decode split kernel
    block_n (keys per step), the layernorm forward block_rows (rows per program), the int8
    linear block_m (rows), block_n (output channels) and block_k (reduction step).
    ``variant``: a kernel module's name for an alternative code path of the same kernel
    (e.g. causal attention's ``tma``), None for its plain path; the module validates it."""

    num_warps: int
    num_stages: int = 1
    block_m: Optional[int] = None
    block_n: Optional[int] = None
    block_rows: Optional[int] = None
    block_k: Optional[int] = None
    variant: Optional[str] = None

    def __post_init__(self):
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant.isidentifier()):
            raise ValueError(f"LaunchConfig.variant must be None or a name, got {self.variant!r}")
        for field in dataclasses.fields(self):
            if field.name == "variant":
                continue
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchConfig.{field.name} must be a positive int, got {value!r}")
            if field.name != "num_stages" and value & (value - 1):
                raise ValueError(f"LaunchConfig.{field.name} must be a power of two, got {value}")

    def to_dict(self) -> dict:
        """The fields that are set (the JSON form of tuned tables)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, fields: dict) -> "LaunchConfig":
        """Inverse of ``to_dict``; ValueError on unknown fields or bad values."""
        if not isinstance(fields, dict):
            raise ValueError(f"a launch config must be a JSON object, got {fields!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown launch config fields {sorted(unknown)} (known: {sorted(known)})")
        return cls(**fields)

    def tag(self) -> str:
        """A short name, e.g. ``m128_n64_w8_s3`` (``m128_n64_w8_s3_tma`` with a variant), for
        report rows and tuning results."""
        parts = [f"{p}{v}" for p, v in (("m", self.block_m), ("n", self.block_n), ("r", self.block_rows),
                                                 ("k", self.block_k))
                 if v is not None]
        return "_".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"] + ([self.variant] if self.variant else []))


# --------------------------------------------------------------------------------------
# Static compile entries (gptfast.compile_report)
# --------------------------------------------------------------------------------------


def pointer(dtype: torch.dtype) -> str:
    """Triton's signature type of a pointer to ``dtype``, e.g. ``*bf16``."""
    return "*" + TRITON_TYPE[dtype]


def static_entry(name: str, fn, config: LaunchConfig, constexprs: dict, *, pointers: dict, floats=(),
                 divisible_by_16=None, require_hgmma: bool = False, require_ptx=(), require_sass=()) -> dict:
    """One entry of a module's ``static_configs()``, as ``gptfast.compile_report`` compiles it.

    Every argument of the jit function ``fn`` is typed: ``constexprs`` by value, the
    ``pointers`` by their Triton type (``pointer(dtype)``), those named in ``floats`` fp32,
    the rest i32. ``divisible_by_16`` names the integers a real launch specialises as multiples
    of 16 (default: every integer stride; pointers are always taken as 16-byte aligned),
    so the static compile matches the launch. ``require_hgmma``: the SASS must use Hopper
    tensor cores; ``require_ptx``: instructions the PTX must contain; ``require_sass``: SASS
    opcodes (e.g. ``UTMALDG``, a tensor-memory copy) the machine code must contain.
    """
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    unknown = (set(constexprs) | set(pointers)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"static_entry {name}: {sorted(unknown)} are not arguments of {fn.__name__}")
    if divisible_by_16 is None:
        divisible_by_16 = [a for a, ty in signature.items() if ty == "i32" and a.startswith("stride")]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": config.num_warps, "num_stages": config.num_stages, "require_hgmma": require_hgmma,
            "divisible_by_16": list(divisible_by_16), "require_ptx": list(require_ptx),
            "require_sass": list(require_sass)}


def ast_source(entry: dict):
    """``triton.compiler.ASTSource`` of a static entry, its pointers and ``divisible_by_16``
    integers specialised as multiples of 16."""
    from triton.compiler import ASTSource

    fn = entry["fn"]
    signature = dict(entry["signature"])
    aligned = {n for n, ty in signature.items() if ty.startswith("*")} | set(entry.get("divisible_by_16", ()))
    # Sorted: the attrs' text is part of triton's cache key, and set order varies per process.
    attrs = {(index,): [["tt.divisibility", 16]] for index in sorted(fn.arg_names.index(n) for n in aligned)}
    return ASTSource(fn, signature, constexprs=dict(entry.get("constexprs", {})), attrs=attrs)


# --------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------
# Compiled for a GPU, ``a / b`` and ``tl.sqrt`` on fp32 become the approximate
# ``div.full.f32`` and ``sqrt.approx.f32`` (about 2 ulp; the interpreter, which runs NumPy,
# never shows it). For fp32 outputs that error is visible against plain PyTorch, which
# rounds to nearest, so fp32 paths use ``div.rn`` / ``sqrt.rn``; fp16 and bf16 outputs
# round far coarser than 2 ulp of fp32 and keep the fast forms. Kernels pass
# ``PRECISE = <output pointer>.dtype.element_ty == tl.float32``.


@triton.jit
def div(a, b, PRECISE: tl.constexpr):
    """a / b, rounded to nearest when PRECISE (fp32 ``a``; ``b`` may be an integer)."""
    if PRECISE:
        return tl.div_rn(a, tl.cast(b, tl.float32))
    else:
        return a / b


@triton.jit
def rsqrt(x, PRECISE: tl.constexpr):
    """1 / sqrt(x), both steps rounded to nearest when PRECISE (fp32 operand)."""
    if PRECISE:
        return tl.div_rn(1.0, tl.sqrt_rn(x))
    else:
        return 1.0 / tl.sqrt(x)
