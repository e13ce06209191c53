"""Tune the Triton kernels on the device at hand and write a tuned configuration table.

    python -m gptfast.tune --out FILE.json [--quick] [--budget-s S] [--dry-run [--device-name NAME]]
    python -m gptfast.tune --install FILE.json

For each tunable kernel (attention forward / dK-dV / dQ at D 64 and 128, the decode
split kernel, layernorm forward and backward, the decode step's skinny matmul per GPT-2
weight shape; each kernel module's ``CANDIDATES``) and
each of its benchmark shapes, every candidate launch config is first checked against the
reference twin (``gptfast.reference``) by the error-ratio rule, then timed with
``gptfast.bench.harness.time_call``. A candidate that fails a check on any shape is out.
The winner per (kernel, shape key) is the passing candidate with the least summed median
time; winners and every candidate's results go to the table (format:
``gptfast.kernels._tuned``), rewritten after each kernel, so a run cut short still leaves
a valid table of what it finished.

Correctness is checked on one batch row and two heads of each benchmark shape (same
sequence length and head size, so the same tiles, causal split and edges; the reference
in float64 needs memory quadratic in T), timing on the full shape.

Kernels are tuned most valuable first (``ORDER``: GPT-2's head size and width, then the
larger ones), so a run stopped by ``--budget-s`` or a time limit leaves the keys that
matter most. Timing is short (``Context.time``: a few warm-up calls, tens of milliseconds
of repetitions; CUDA-graph replay for the microsecond kernels): the compiles are meant
to be done beforehand, in parallel (``warm_tasks``, run by ``gptfast.bench.warm``).

``--quick``: every candidate on the first shape of each kernel. ``--dry-run``:
the same plumbing on a CPU through the Triton interpreter (tiny shapes, two candidates,
a fake device named by ``--device-name``), seconds long: the rehearsal of the GPU suite.
``--install FILE``: validate a table and copy it into ``kernels/tuned/`` under its
device's file name, where the launchers find it (commit that file).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Callable, List, Optional

MAX_RATIO = 3.0  # the error-ratio rule's limit (gptfast.testing.assert_error_ratio)

# (kernel, key), most valuable first: GPT-2 124M's attention (D 64), layernorm (hidden
# 768) and decode, then D 128 and the wider layernorms. Anything not listed comes last.
ORDER = (
    ("causal_attention.fwd", "d64_16bit"), ("decode_attention.split", "d64_16bit"),
    ("layer_norm.fwd", "n1024_16bit"), ("layer_norm.bwd", "n1024_16bit"),
    ("causal_attention.fwd", "d64_16bit_short"),
    ("skinny_linear.fwd", "n4096_k1024_16bit"), ("skinny_linear.fwd", "n1024_k1024_16bit"),
    ("skinny_linear.fwd", "n1024_k4096_16bit"),
    ("skinny_linear.fwd", "n65536_k1024_16bit"), ("skinny_linear.fwd", "n4096_k1024_int8"),
    ("skinny_linear.fwd", "n1024_k1024_int8"),
    ("skinny_linear.fwd", "n1024_k4096_int8"), ("skinny_linear.fwd", "n65536_k1024_int8"),
    ("causal_attention.dkdv", "d64_16bit"), ("causal_attention.dq", "d64_16bit"),
    ("causal_attention.fwd", "d128_16bit"), ("causal_attention.dkdv", "d128_16bit"),
    ("causal_attention.dq", "d128_16bit"), ("causal_attention.fwd", "d128_16bit_short"),
    ("decode_attention.split", "d128_16bit"),
    ("layer_norm.fwd", "n4096_16bit"), ("layer_norm.bwd", "n4096_16bit"),
    ("layer_norm.fwd", "n2048_16bit"), ("layer_norm.bwd", "n2048_16bit"),
    ("layer_norm.fwd", "n8192_16bit"), ("layer_norm.bwd", "n8192_16bit"),
)


@dataclasses.dataclass
class Tunable:
    """One kernel at one shape key: its candidates and how to exercise them.

    ``make(shape)`` builds the inputs of a benchmark shape; ``run(inputs, cfg)`` launches
    with a candidate and returns the outputs to check; ``references(inputs)`` returns
    ``(plain, exact)`` output lists (the reference twin in the inputs' dtype and in
    float64) for the checked slice ``check_slice(inputs)``.
    """

    kernel: str
    key: str
    candidates: list
    shapes: List[dict]
    make: Callable
    run: Callable
    references: Callable
    check_slice: Callable
    cuda_graph: bool = False


# --------------------------------------------------------------------------------------
# The kernels, their shapes and their references
# --------------------------------------------------------------------------------------


def _outputs_and_grads(fn, inputs, grad) -> list:
    """``[fn(*inputs)]`` followed by the gradients of ``(fn(*inputs) * grad).sum()`` wrt each input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _attention_tunables(ctx) -> list:
    import torch

    from gptfast import reference
    from gptfast.kernels import causal_attention as ka

    def make(shape):
        b, h, t, d = shape["B"], shape["H"], shape["T"], shape["D"]
        q, k, v, g = (ctx.randn(b, h, t, d, seed=i) for i in range(4))
        scale = 1.0 / math.sqrt(d)
        out, lse = ka.attention_forward(q, k, v, scale)
        return {"q": q, "k": k, "v": v, "grad": g, "out": out, "lse": lse, "scale": scale}

    def check_slice(x):
        rows = {n: x[n][:1, :2] for n in ("q", "k", "v", "grad", "out", "lse")}
        return {**rows, "scale": x["scale"]}

    def references(x):
        plain = _outputs_and_grads(reference.causal_attention, [x[n] for n in ("q", "k", "v")], x["grad"])
        exact = _outputs_and_grads(reference.causal_attention, [x[n].double() for n in ("q", "k", "v")],
                                   x["grad"].double())
        return plain, exact

    def run_fwd(x, cfg):
        return [ka.attention_forward(x["q"], x["k"], x["v"], x["scale"], config=cfg)[0]]

    def run_bwd(which):
        def run(x, cfg):
            dq, dk, dv = ka.attention_backward(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"], x["scale"],
                                               **{f"{which}_cfg": cfg})
            return [None, dq, None, None] if which == "dq" else [None, None, dk, dv]
        return run

    tunables = []
    for d in (64, 128):
        key = ka.config_key(d, torch.float16)
        for kernel, run in (("fwd", run_fwd), ("dkdv", run_bwd("dkdv")), ("dq", run_bwd("dq"))):
            tunables.append(Tunable(f"causal_attention.{kernel}", key, ka.CANDIDATES[kernel][key],
                                    ctx.attention_shapes(d), make, run, references, check_slice))
        # The forward's short-sequence key (ka.forward_key): its own candidates and lengths.
        short = ka.forward_key(d, torch.float16, ka.SHORT_MAX_LEN)
        tunables.append(Tunable("causal_attention.fwd", short, ka.CANDIDATES["fwd"][short],
                                ctx.attention_shapes(d, max_len=ka.SHORT_MAX_LEN), make, run_fwd, references,
                                check_slice))
    return tunables


def _decode_tunables(ctx) -> list:
    import torch

    from gptfast import reference
    from gptfast.kernels import decode_attention as kd

    def make(shape):
        b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
        lens = torch.full((b,), s, dtype=torch.int32, device=ctx.device)
        return {"q": ctx.randn(b, h, d, seed=0), "k": ctx.randn(b, h, s, d, seed=1),
                "v": ctx.randn(b, h, s, d, seed=2), "lens": lens, "scale": 1.0 / math.sqrt(d)}

    def check_slice(x):
        return {"q": x["q"][:1, :2], "k": x["k"][:1, :2], "v": x["v"][:1, :2], "lens": x["lens"][:1],
                "scale": x["scale"]}

    def references(x):
        args = (x["q"], x["k"], x["v"])
        plain = reference.decode_attention(*args, x["lens"], scale=x["scale"])
        exact = reference.decode_attention(*(t.double() for t in args), x["lens"], scale=x["scale"])
        return [plain], [exact]

    def run(x, cfg):
        return [kd.decode_attention(x["q"], x["k"], x["v"], x["lens"], x["scale"], config=cfg)]

    return [Tunable("decode_attention.split", key, candidates, ctx.decode_shapes(int(key[1:].split("_")[0])),
                    make, run, references, check_slice, cuda_graph=True)
            for key, candidates in kd.CANDIDATES["split"].items()]


def _layer_norm_tunables(ctx) -> list:
    from gptfast import reference
    from gptfast.kernels import layer_norm as kl

    def make(shape):
        rows, n = shape["rows"], shape["hidden"]
        x = ctx.randn(rows, n, seed=0)
        w, b = ctx.randn(n, seed=1, scale=0.5, shift=1.0), ctx.randn(n, seed=2)
        _, _, mean, rstd = kl.layer_norm_fwd(x, w, b, 1e-5)
        return {"x": x, "w": w, "b": b, "dy": ctx.randn(rows, n, seed=3), "mean": mean, "rstd": rstd}

    def check_slice(x):
        return {n: t[:64] if n in ("x", "dy", "mean", "rstd") else t for n, t in x.items()}

    def references(x):
        plain = _outputs_and_grads(reference.layer_norm, [x[n] for n in ("x", "w", "b")], x["dy"])
        exact = _outputs_and_grads(reference.layer_norm, [x[n].double() for n in ("x", "w", "b")], x["dy"].double())
        return plain, exact

    def run_fwd(x, cfg):
        return [kl.layer_norm_fwd(x["x"], x["w"], x["b"], 1e-5, config=cfg)[0]]

    def run_bwd(x, cfg):
        return [None, *kl.layer_norm_bwd(x["dy"], x["x"], x["w"], x["mean"], x["rstd"], config=cfg)]

    tunables = []
    for kind, run in (("fwd", run_fwd), ("bwd", run_bwd)):
        for key, candidates in kl.CANDIDATES[kind].items():
            shapes = ctx.layer_norm_shapes(int(key[1:].split("_")[0]))
            if shapes:
                tunables.append(Tunable(f"layer_norm.{kind}", key, candidates, shapes, make, run, references,
                                        check_slice, cuda_graph=True))
    return tunables


def _skinny_linear_tunables(ctx) -> list:
    """The decode step's matmul (``kernels/skinny_linear``) per GPT-2 weight shape (c_attn,
    attention c_proj, c_fc, MLP c_proj, the LM head), 16-bit and int8 weights, with the
    layer-norm prologue and the bias on (the heaviest prologue every shape meets)."""
    import torch
    from gptfast import reference
    from gptfast.kernels import skinny_linear as ks
    from gptfast.ops.int8_linear import quantize_weight

    def make(shape):
        m, n, k = shape["M"], shape["N"], shape["K"]
        weight, scale = ctx.randn(n, k, seed=1, scale=k ** -0.5), None
        if shape["kind"] == "int8":
            weight, scale = quantize_weight(weight, torch.float32)
        return {"x": ctx.randn(m, k, seed=0), "w": weight, "scale": scale, "b": ctx.randn(n, seed=2),
                "g": ctx.randn(k, seed=3, scale=0.5, shift=1.0), "beta": ctx.randn(k, seed=4)}

    def check_slice(x):  # the first 512 output channels: the same tiles and K loop, a small float64 check
        return {n: t[:512] if n in ("w", "scale", "b") and t is not None else t for n, t in x.items()}

    def references(x):
        def ref(dtype):
            cast = (lambda t: t if t is None or t.dtype == torch.int8 else t.to(dtype))
            return reference.skinny_linear(cast(x["x"]), cast(x["w"]), cast(x["b"]), scale=cast(x["scale"]),
                                           ln_weight=cast(x["g"]), ln_bias=cast(x["beta"]))
        return [ref(x["x"].dtype)], [ref(torch.float64)]

    def run(x, cfg):
        return [ks.skinny_linear(x["x"], x["w"], x["b"], scale=x["scale"], ln_weight=x["g"], ln_bias=x["beta"],
                                 config=cfg)]

    tunables = []
    for key, candidates in ks.CANDIDATES["fwd"].items():
        shapes = ctx.skinny_shapes(key, ks)
        if shapes:
            tunables.append(Tunable("skinny_linear.fwd", key, candidates, shapes, make, run, references, check_slice,
                                    cuda_graph=True))
    return tunables


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Context:
    """Device, dtype, shapes and timing options of one tuning run."""

    def __init__(self, device, dtype, quick: bool, dry_run: bool):
        self.device, self.dtype, self.quick, self.dry_run = device, dtype, quick, dry_run

    def randn(self, *shape, seed, scale=1.0, shift=0.0):
        from gptfast.testing import randn

        return randn(*shape, dtype=self.dtype, seed=seed, scale=scale, shift=shift, device=self.device)

    def _pick(self, shapes):
        return shapes[:1] if self.quick or self.dry_run else shapes

    def attention_shapes(self, d, max_len=None):
        """The benchmark grid's shapes; with ``max_len`` its short sequences (T 512 and 1024)."""
        if self.dry_run:
            return [{"B": 1, "H": 2, "T": 48, "D": d}]
        # The benchmark grid's B*T = 16k tokens and H*D = 2048 (gptfast.bench.suites.causal_attention).
        lengths = (2048, 8192) if max_len is None else (1024, 512)
        return self._pick([{"B": 16384 // t, "H": 2048 // d, "T": t, "D": d} for t in lengths])

    def decode_shapes(self, d):
        if self.dry_run:
            return [{"B": 1, "H": 2, "S": 256, "D": d}]
        return self._pick([{"B": b, "H": 12, "S": 32768, "D": d} for b in (1, 16)])

    def layer_norm_shapes(self, block_n):
        if self.dry_run:
            return [{"rows": 8, "hidden": block_n}] if block_n == 1024 else []
        # The benchmark widths (gptfast.bench.suites.layer_norm) whose BLOCK_N is block_n.
        hidden = [h for h in (768, 1024, 1600, 4096, 8192) if 1 << (h - 1).bit_length() == block_n]
        return self._pick([{"rows": 16384, "hidden": h} for h in hidden])

    def skinny_shapes(self, key, ks):
        """The decode rows (batch 1 and 8) times each GPT-2 weight (N, K) under ``key``."""
        kind = key.rsplit("_", 1)[1]
        weights = [(n, k) for n, k in ks.TUNING_SHAPES if ks.config_key(n, k, kind) == key]
        if self.dry_run:
            return [{"M": 2, "N": 96, "K": 160, "kind": kind}] if key == "n4096_k1024_16bit" else []
        return self._pick([{"M": m, "N": n, "K": k, "kind": kind} for n, k in weights for m in (1, 8)])

    def candidates(self, tunable):
        return tunable.candidates[:2 if self.dry_run else None]

    def time(self, fn, cuda_graph):
        """Short timing: the candidates compiled beforehand, tens of milliseconds tell them apart."""
        from gptfast.bench.harness import time_call

        if self.dry_run:
            return time_call(fn, device=self.device, warmup=1, target_ms=1.0, min_reps=1, max_reps=2)
        return time_call(fn, device=self.device, warmup=2, target_ms=15.0 if self.quick else 60.0,
                         min_reps=5, max_reps=40, cuda_graph=cuda_graph)


def all_tunables(ctx) -> list:
    """Every tunable kernel and key, in ``ORDER``."""
    tunables = (_attention_tunables(ctx) + _decode_tunables(ctx) + _layer_norm_tunables(ctx)
                + _skinny_linear_tunables(ctx))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(tunables, key=lambda t: rank.get((t.kernel, t.key), len(ORDER)))


def warm_tasks(device, dry_run: bool = False) -> list:
    """``(label, run)`` per candidate of every tunable (``--quick``'s shapes): ``run``
    launches the candidate on the checked slice and on the timed shape, so that its
    compiled kernels are in Triton's cache (``TRITON_CACHE_DIR``) before the tune stage.
    Inputs are made inside each task, in the process that runs it."""
    import torch

    device = torch.device(device)
    ctx = Context(device, torch.float16 if dry_run else torch.bfloat16, quick=True, dry_run=dry_run)

    def task(tunable, cfg):
        def run():
            inputs = tunable.make(tunable.shapes[0])
            tunable.run(tunable.check_slice(inputs), cfg)
            tunable.run(inputs, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    return [(f"tune {t.kernel} {t.key} {cfg.tag()}", task(t, cfg)) for t in all_tunables(ctx)
            for cfg in ctx.candidates(t)]


def check_candidate(tunable, inputs, cfg, plain, exact) -> float:
    """The worst error ratio of the candidate's outputs (inf for NaN); outputs that are
    None are not this kernel's."""
    from gptfast.testing import error_ratio

    outputs = tunable.run(inputs, cfg)
    return max(error_ratio(o, p, e) for o, p, e in zip(outputs, plain, exact) if o is not None)


def tune_one(ctx, tunable, results: list):
    """Check and time every candidate of ``tunable`` on its shapes; return the winner (a
    LaunchConfig), or None when no candidate passed. Appends one row per run to ``results``."""
    candidates = ctx.candidates(tunable)
    total = {cfg: 0.0 for cfg in candidates}
    for shape in tunable.shapes:
        inputs = tunable.make(shape)
        checked = tunable.check_slice(inputs)
        plain, exact = tunable.references(checked)
        for cfg in candidates:
            if cfg not in total:
                continue
            row = {"kernel": tunable.kernel, "key": tunable.key, "shape": shape, "config": cfg.to_dict()}
            try:
                ratio = check_candidate(tunable, checked, cfg, plain, exact)
                row["ok"] = ratio <= MAX_RATIO
                row["error_ratio"] = ratio if math.isfinite(ratio) else None  # strict JSON has no inf
                if row["error_ratio"] is None:
                    row["error"] = "non-finite output (NaN or inf)"
                if row["ok"]:
                    timing = ctx.time(lambda _, cfg=cfg: tunable.run(inputs, cfg), tunable.cuda_graph)
                    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                               method=timing.method)
                    total[cfg] += timing.median_ms
            except Exception as e:  # a candidate that cannot run is out, the others go on
                if _is_cuda_error(e):  # sticky: every later launch in this process would fail too
                    raise CudaErrorStop(f"CUDA error at {tunable.kernel} {tunable.key} {shape} "
                                        f"{cfg.to_dict()}: {e}") from e
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            if not row["ok"]:
                total.pop(cfg)
            results.append(row)
            print(_result_line(row), flush=True)
    return min(total, key=total.get) if total else None


class CudaErrorStop(RuntimeError):
    """A CUDA error: the process cannot launch anything more, so tuning stops here."""


def _is_cuda_error(e: Exception) -> bool:
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises this for CUDA errors
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and "CUDA error" in str(e)


def _result_line(row) -> str:
    status = (f"{row['median_ms']:.4f} ms" if row.get("median_ms") is not None
              else row.get("error") or f"FAILED error ratio {row.get('error_ratio'):.2f}")
    shape, cfg = json.dumps(row["shape"]), json.dumps(row["config"])
    return f"{row['kernel']:<24} {row['key']:<12} {shape:<44} {cfg:<72} {status}"


def identity_for(args, device) -> dict:
    from gptfast.kernels import _tuned

    if args.dry_run:
        import triton

        return {"name": args.device_name, "capability": [0, 0], "triton": triton.__version__}
    identity = _tuned.device_identity(device)
    if args.device_name:
        identity["name"] = args.device_name
    return identity


def write_table(path: str, identity: dict, winners: dict, results: list) -> None:
    """Write (atomically) and re-read the table, so what is left on disk is always valid."""
    from gptfast.kernels import _tuned

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_tuned.table_json(identity, winners, results), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    _tuned.read_table(path)


def run_tuning(args) -> int:
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Context(device, torch.float16 if args.dry_run else torch.bfloat16, args.quick, args.dry_run)
    identity = identity_for(args, device)
    tunables = all_tunables(ctx)
    if args.kernels:
        wanted = set(args.kernels.split(","))
        tunables = [t for t in tunables if t.kernel in wanted or t.kernel.split(".")[0] in wanted]
        if not tunables:
            print(f"--kernels {args.kernels}: no tunable kernel of that name", file=sys.stderr)
            return 2
    winners, results = {}, []
    write_table(args.out, identity, winners, results)
    started = time.monotonic()
    for done, tunable in enumerate(tunables):
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            left = ", ".join(f"{t.kernel} {t.key}" for t in tunables[done:])
            print(f"time budget of {args.budget_s:g} s spent: not tuned (built-in configs stay): {left}")
            print(f"tuned {len(winners)} of {len(tunables)} kernel shapes for {identity['name']}; table: {args.out}")
            return 0
        try:
            winner = tune_one(ctx, tunable, results)
        except CudaErrorStop as e:
            print(f"{e}\nstopping; the table keeps the {len(winners)} kernel shapes tuned before", flush=True)
            return 2
        if winner is not None:
            winners[(tunable.kernel, tunable.key)] = winner
        write_table(args.out, identity, winners, results)
    failed = [(t.kernel, t.key) for t in tunables if (t.kernel, t.key) not in winners]
    print(f"tuned {len(winners)} of {len(tunables)} kernel shapes for {identity['name']}; table: {args.out}")
    for kernel, key in failed:
        print(f"  no candidate of {kernel} {key} passed: the built-in config stays")
    return 1 if failed else 0


def install(path: str, directory: Optional[str] = None) -> str:
    """Validate the table at ``path`` and copy it into the tuned-table directory under its
    device's file name; returns the new path."""
    from gptfast.kernels import _tuned

    table = _tuned.read_table(path)
    directory = directory or _tuned.TUNED_DIR
    target = os.path.join(directory, _tuned.table_file_name(table["device"]))
    try:
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(path, target)
    except OSError as e:
        raise type(e)(f"cannot copy {path!r} to {target!r}: {e.strerror or e}") from None
    _tuned._load_tables.cache_clear()
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.tune", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", metavar="FILE", help="tune on this device and write the table to FILE")
    action.add_argument("--install", metavar="FILE", help="validate a table and copy it into kernels/tuned/")
    parser.add_argument("--quick", action="store_true", help="first 4 candidates, first shape of each kernel")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal through the Triton interpreter")
    parser.add_argument("--device-name", help="device name recorded in the table (with --dry-run: the fake "
                        "device, default dry-run-cpu)")
    parser.add_argument("--kernels", help="comma-separated kernels or modules, e.g. layer_norm,causal_attention.fwd")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new kernel after this many seconds (the table keeps what was tuned)")
    args = parser.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.install:
        from gptfast.kernels import _tuned

        try:
            print(f"installed {install(args.install)}")
        except (_tuned.TunedTableError, OSError) as e:  # the CLI promise: one clear line, no traceback
            print(f"python -m gptfast.tune: error: --install: {e}", file=sys.stderr)
            return 2
        return 0
    from gptfast.runtime.atomic_files import check_output_file

    try:
        check_output_file(args.out, "--out")  # before the tuning, not after
    except OSError as e:
        print(f"python -m gptfast.tune: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        args.device_name = args.device_name or "dry-run-cpu"
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run must set TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("tuning needs a CUDA device (use --dry-run to rehearse on a CPU)")
    return run_tuning(args)


if __name__ == "__main__":
    sys.exit(main())
