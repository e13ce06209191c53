"""Numerics helpers shared by the tests, ``gptfast check`` and the benchmarks.

The error-ratio rule: a fused op's error against a float64 reference may be at most a
small multiple of the error that plain PyTorch makes in the same dtype.
``count_device_kernels`` counts the device kernels one call would launch (Triton launches
plus kernel-launching aten ops), for tests that bound a decode step's launches.
"""
import contextlib
import dataclasses

import torch

# Fill value written into outputs before a kernel runs, so unwritten elements show up.
POISON = float("nan")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the max integer) in place and return it."""
    if t.is_floating_point():
        return t.fill_(POISON)
    return t.fill_(torch.iinfo(t.dtype).max)


@contextlib.contextmanager
def poisoned_kernel_outputs():
    """While active, every output and scratch buffer the Triton launchers allocate
    (``gptfast.kernels._common.empty``) is poisoned first, so a finite result proves the
    kernels wrote each element. Imports the kernels (and triton) when entered."""
    from gptfast.kernels import _common

    with _common.fill_outputs(poison_):
        yield


def randn(*shape, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0, shift: float = 0.0,
          device="cpu", generator: torch.Generator = None) -> torch.Tensor:
    """Seeded standard normal values times ``scale`` plus ``shift``, in ``dtype`` on
    ``device``: drawn and scaled in float64 on the CPU, so the same on every device.
    ``generator`` (a CPU generator) draws from a running stream instead of ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    t = torch.randn(*(shape or ((),)), generator=g, dtype=torch.float64) * scale + shift  # () : a scalar
    return t.to(device=device, dtype=dtype)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def error_ratio(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, floor: float = 1e-6) -> float:
    """max|fused - exact| / max(max|plain - exact|, floor). NaN anywhere gives inf.

    ``exact`` is the float64 reference; ``plain`` is plain PyTorch in the fused op's
    dtype. ``floor`` keeps the ratio meaningful when plain PyTorch happens to be exact.
    """
    if not torch.isfinite(fused.double()).all():
        return float("inf")
    return max_abs_error(fused, exact) / max(max_abs_error(plain, exact), floor)


def assert_error_ratio(fused, plain, exact, max_ratio: float = 3.0, floor: float = 1e-6, what: str = "") -> float:
    """Assert the error-ratio rule and return the ratio."""
    ratio = error_ratio(fused, plain, exact, floor)
    assert ratio <= max_ratio, (
        f"{what}: fused error {max_abs_error(fused, exact):.3e} is {ratio:.2f}x plain PyTorch's "
        f"{max_abs_error(plain, exact):.3e} (allowed {max_ratio}x)"
    )
    return ratio


# --------------------------------------------------------------------------------------
# Counting device kernels
# --------------------------------------------------------------------------------------

# aten ops that launch no device kernel: allocations, metadata, aliasing.
_NO_KERNEL_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::set_", "aten::resize_",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size",
    "aten::_reshape_alias", "aten::view", "aten::_to_copy_meta",
})
# aten ops that read a device value on the host (a synchronisation on CUDA).
_HOST_READ_OPS = frozenset({"aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::item"})


@dataclasses.dataclass
class KernelCount:
    """What one call would launch on a device: ``triton`` (kernel names) and ``aten``
    (op names, views, allocations and input checks left out), plus ``host_reads`` (ops
    that read a device value on the host: a synchronisation on CUDA) and ``checks`` (the
    aten ops that only fed those reads: CPU-only input checks, which the CUDA path skips)."""

    triton: list
    aten: list
    host_reads: list
    checks: list

    @property
    def total(self) -> int:
        """Device kernels per call: Triton launches plus kernel-launching aten ops."""
        return len(self.triton) + len(self.aten)


def count_device_kernels(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` once and count the device kernels it would launch.

    Returns ``(result, KernelCount)``. Every Triton launch counts (compiled or
    interpreted; what the interpreter runs inside a launch is not counted), and every
    aten op that would launch a device kernel: matmuls, elementwise ops, reductions,
    copies, index writes, embedding lookups, fills. Not counted: views and other
    aliasing or metadata ops, bare allocations (``empty``), host reads of a value
    (``.item()``, ``bool(t)``; listed in ``host_reads``), and the aten ops whose results
    only flow into such host reads: the value checks an op runs on CPU tensors and skips
    on CUDA (listed in ``checks``). Ops of other namespaces (``torch.library`` custom
    ops such as ``gptfast::*``) are not counted themselves: their implementation runs
    under the same counting, so what they launch is.

    Runs on any device (on a CPU under ``TRITON_INTERPRET=1`` for the Triton kernels); the
    count is the same on CUDA as long as the code takes the same path there.
    """
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    nodes = []  # (kind, name, input ids, output ids, mutable)
    keep = []  # tensors referenced by ids, kept alive so ids stay unique
    launching = [0]

    def ids(tree):
        out = []
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                keep.append(leaf)
                out.append(id(leaf))
        return out

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if launching[0]:
                return func(*args, **kwargs)
            if func.namespace not in ("aten", "prims"):
                with self:  # run the custom op's implementation under this mode
                    return func.redispatch(_implementation_keys(func, args), *args, **kwargs)
            out = func(*args, **kwargs)
            name = func._schema.name
            if name in _HOST_READ_OPS:
                kind = "host_read"
            elif func.is_view or name in _NO_KERNEL_OPS:
                kind = "free"
            else:
                kind = "aten"
            nodes.append((kind, name, ids((args, kwargs)), ids(out), func._schema.is_mutable))
            return out

    def wrap(run):
        def launch(self, *a, **kw):
            if not kw.get("warmup", False) and not launching[0]:
                nodes.append(("triton", getattr(self, "__name__", type(self).__name__), ids((a, kw)), [], True))
            launching[0] += 1
            try:
                return run(self, *a, **kw)
            finally:
                launching[0] -= 1
        return launch

    patched = _triton_launch_classes()
    saved = [(cls, cls.run) for cls in patched]
    try:
        for cls, run in saved:
            cls.run = wrap(run)
        with _Counter():
            result = fn(*args, **kwargs)
    finally:
        for cls, run in saved:
            cls.run = run
    return result, _classify(nodes, set(ids(result)))


def _implementation_keys(func, args):
    """The dispatch key set that reaches a custom op's own implementation."""
    key = torch._C.DispatchKey
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeExplicitAutograd"):
        return torch._C.DispatchKeySet(key.CompositeExplicitAutograd)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device.type if tensors else "cpu"
    return torch._C.DispatchKeySet(key.CUDA if device == "cuda" else key.CPU)


def _triton_launch_classes() -> list:
    """The classes whose ``run`` launches a Triton kernel (compiled and interpreted)."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


def _classify(nodes, returned: set) -> "KernelCount":
    """Split the recorded nodes; an aten node whose every output is consumed, and only by
    host reads or by other such nodes, is a check (walked back to front)."""
    consumers = {}
    for index, (_, _, inputs, _, _) in enumerate(nodes):
        for t in inputs:
            consumers.setdefault(t, []).append(index)
    check = [False] * len(nodes)
    for index in range(len(nodes) - 1, -1, -1):
        kind, _, _, outputs, mutable = nodes[index]
        if kind not in ("aten", "free") or mutable or not outputs or any(t in returned for t in outputs):
            continue
        check[index] = all(consumers.get(t) and all(nodes[c][0] == "host_read" or check[c] for c in consumers[t])
                           for t in outputs)
    count = KernelCount(triton=[], aten=[], host_reads=[], checks=[])
    for index, (kind, name, _, _, _) in enumerate(nodes):
        if kind == "triton":
            count.triton.append(name)
        elif kind == "host_read":
            count.host_reads.append(name)
        elif kind == "aten":
            (count.checks if check[index] else count.aten).append(name)
    return count
