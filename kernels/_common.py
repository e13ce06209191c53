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
* ``launch(fn, grid, *args, **kwargs)``: what ``fn[grid](*args, **kwargs)`` does, with a
  fast path for a specialisation already compiled (see ``launch``); ``launches_skipped()``
  turns every launch into a no-op (the overhead benchmark's "dispatch only" rows).
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
from typing import Callable, Dict, Optional, Tuple

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


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints, without the cost of calling a triton constexpr function."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints >= 0, as cheap as plain Python."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the next power of two >= max(head_dim, 16) (tl.dot needs K >= 16)."""
    return max(16, next_power_of_2(head_dim))


_NULL_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """Launch on ``device`` (a no-op off CUDA, and when ``device`` is already current:
    entering ``torch.cuda.device`` costs microseconds a call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NULL_GUARD
    return torch.cuda.device(device)


# --------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------
# ``fn[grid](*args)`` costs tens of microseconds of host time per call in triton 3.6
# (JITFunction.run: option parsing and knob reads, binding every argument, the
# specialisation's cache key, the check of used globals, launch metadata), several times
# a torch op. Once a specialisation is compiled, a launch only needs the CompiledKernel's
# launcher with the grid, the stream and the arguments. ``launch`` keeps that handle per
# (kernel, specialisation key) and calls it directly.
#
# The key must separate every pair of calls Triton would compile differently, or a kernel
# compiled for one specialisation runs on arguments of another (wrong results). Triton
# 3.6 specialises (``native_specialize_impl``, checked by tests/test_overhead.py against
# triton's own binder):
#   * a tensor by its dtype and whether its data pointer is 16-byte aligned;
#   * None as a constexpr;
#   * a bool as ``u1`` (no value);
#   * an int by its type (i32 when it fits, else i64, else u64), whether it is 1 (then a
#     constexpr) and whether it is a multiple of 16;
#   * a float as fp32 (no value);
#   * constexprs and options (num_warps, num_stages ...) by value.
# ``_arg_key`` below takes exactly those facts (a finer key only costs an extra miss,
# which goes through ``fn.run`` and finds Triton's own cached kernel). The key also holds
# the current CUDA device (Triton compiles per device). Whatever the fast path cannot
# honour goes through ``fn.run``: the interpreter, a launch-enter hook (profilers), an
# argument of another type.

_skip_launches = False
_I32_MIN, _I32_MAX, _I64_MIN, _I64_MAX = -2**31, 2**31 - 1, -2**63, 2**63 - 1


@contextlib.contextmanager
def launches_skipped():
    """Every ``launch`` inside returns without launching (outputs stay unwritten): the
    overhead benchmark times the layers above the kernel this way on a CPU."""
    global _skip_launches
    previous, _skip_launches = _skip_launches, True
    try:
        yield
    finally:
        _skip_launches = previous


def _arg_key(a):
    """What Triton's specialisation of one runtime argument depends on (see above); raises
    TypeError for a type the fast path does not know."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if a is None:
        return None
    if a is True or a is False:
        return "u1"
    if type(a) is int:
        kind = 0 if _I32_MIN <= a <= _I32_MAX else 1 if _I64_MIN <= a <= _I64_MAX else 2
        return (kind, a == 1, a & 15 == 0)
    if type(a) is float:
        return "fp32"
    raise TypeError(type(a).__name__)


def specialization_key(args: tuple, kwargs: dict) -> tuple:
    """``launch``'s cache key of one call (without the device)."""
    return tuple(map(_arg_key, args)) + tuple(kwargs.items())


class _Handle:
    """A compiled kernel's launcher and what it needs besides the arguments."""

    __slots__ = ("run", "function", "packed_metadata", "tail")

    def __init__(self, kernel, tail: Tuple[str, ...]):
        self.run = kernel.run  # initialises the module and function handles
        self.function = kernel.function
        self.packed_metadata = kernel.packed_metadata
        self.tail = tail  # names of the parameters passed by keyword, in parameter order


_handles: Dict[tuple, _Handle] = {}
_cuda_driver = []  # [(current_device, current_stream, runtime knobs)] of triton, once looked up


def _driver():
    if not _cuda_driver:
        from triton import knobs
        from triton.runtime import driver

        _cuda_driver.append((driver.active.get_current_device, driver.active.get_current_stream, knobs.runtime))
    return _cuda_driver[0]


def _hooked(hook) -> bool:
    """Whether a launch hook (a profiler's) is installed: Triton's own path then calls it."""
    return hook is not None and getattr(hook, "calls", True) != []


def launch(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``: runtime arguments by position (a prefix of ``fn``'s
    parameters), the constexprs after them and the launch options (``num_warps``,
    ``num_stages``) by keyword. ``grid`` is a tuple of 1 to 3 ints.

    The first call of a specialisation goes through Triton (compiling or finding the
    kernel in its caches); later ones call the compiled launcher directly (no launch
    hooks, no metadata: with a hook installed every call takes Triton's path).
    """
    if _skip_launches:
        return
    if not hasattr(fn, "device_caches"):  # the interpreter's InterpretedFunction
        fn[grid](*args, **kwargs)
        return
    current_device, current_stream, runtime = _driver()
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    device = current_device()
    try:
        key = (fn, device, specialization_key(args, kwargs))
    except TypeError:  # an argument type the key does not model: Triton's own path
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    handle = _handles.get(key)
    if handle is None:
        kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
        if hasattr(kernel, "result"):  # an asynchronous compile
            kernel = kernel.result()
        if kernel is None:  # nothing compiled to keep (Triton declined to compile here)
            return
        names = fn.arg_names[len(args):]
        # Cache it when every parameter was given (no defaults) and every keyword value is a
        # constexpr or option (the key holds keyword values as they are).
        if set(names) <= set(kwargs) and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            _handles[key] = _Handle(kernel, tuple(names))
        return
    handle.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, current_stream(device),
               handle.function, handle.packed_metadata, None, None, None, *args, *[kwargs[n] for n in handle.tail])


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
        # (the field names are looked up once below: dataclasses.fields costs microseconds,
        # paid by every launcher that builds a config)
        for name, optional in _SIZE_FIELDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if type(value) is not int or value < 1:
                raise ValueError(f"LaunchConfig.{name} must be a positive int, got {value!r}")
            if name != "num_stages" and value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")
        # Launchers key cached launch arguments by their config: hashed once, not per call.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f) for f, _ in _SIZE_FIELDS) + (self.variant,)))

    def __hash__(self) -> int:
        return self._hash

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


_SIZE_FIELDS = tuple((f.name, f.default is None) for f in dataclasses.fields(LaunchConfig) if f.name != "variant")


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
