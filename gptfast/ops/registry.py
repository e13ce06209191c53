"""The one list of gptfast's fused ops.

Each op has one name everywhere: ``kernels/<name>.py`` (``gptfast.kernels.<name>``),
``gptfast.ops.<name>``, the benchmark suite ``gptfast.bench.suites.<name>``,
``tests/test_<name>.py``. An entry names the op's three implementations (fused, the
pure-PyTorch reference twin, the torch path) as ``module:function`` strings, resolved
on first use so that reading the registry imports neither triton nor any kernel.
``gptfast check``, ``gptfast profile op``, the benchmark suites and the compile report
take their op lists from here.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Tuple


@dataclass(frozen=True)
class OpSpec:
    name: str
    fused: str  # gptfast.ops.<name>:<name>
    reference: str  # gptfast.reference:<name>
    torch: str  # gptfast.ops.torch_path:<name>

    @property
    def kernel_module(self) -> str:
        return f"gptfast.kernels.{self.name}"

    def resolve(self, which: str) -> Callable:
        """The implementation ``which`` ("fused", "reference" or "torch") as a callable."""
        module, _, attr = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), attr)


def _spec(name: str) -> OpSpec:
    return OpSpec(name, f"gptfast.ops.{name}:{name}", f"gptfast.reference:{name}", f"gptfast.ops.torch_path:{name}")


OPS: Tuple[OpSpec, ...] = tuple(_spec(n) for n in ("layer_norm", "causal_attention", "decode_attention"))
NAMES: Tuple[str, ...] = tuple(op.name for op in OPS)


def get(name: str) -> OpSpec:
    for op in OPS:
        if op.name == name:
            return op
    raise ValueError(f"unknown op {name!r}; gptfast's fused ops are {', '.join(NAMES)}")
