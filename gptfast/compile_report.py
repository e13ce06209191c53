"""Static compile report: every shipped Triton kernel configuration, compiled for the H200.

Runs on any machine, GPU or not. For each module named in
``gptfast.kernels._registry.KERNEL_MODULES`` that exists, the report visits the entries of
``static_configs()`` (the configurations the module ships), of ``candidate_configs()``
(its tuning candidates, see ``gptfast.tune``) and of ``precision_configs()`` (fp32 paths
whose PTX must round to nearest), the latter two where the module has them. Entries are
dicts, built by ``gptfast.kernels._common.static_entry``::

    {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "require_hgmma"}

(optionally ``"divisible_by_16"``: argument names to specialise as multiples of 16, as a
real launch with aligned values would; pointer arguments always are;
``"require_ptx"``: instructions the PTX must contain; and ``"require_sass"``: SASS opcodes the
machine code must contain, e.g. ``UTMALDG`` / ``UTMASTG`` (tensor-memory copies) of a
config that claims the copy engine, or ``ATOMG.E.ADD.F32|REDG.E.ADD.F32`` (fp32 atomic
adds, either opcode) of one that claims atomics). Each is compiled for
``GPUTarget("cuda", 90, 32)`` from ``_common.ast_source(entry)``; the PTX goes through
the ``ptxas`` shipped in triton's wheel (``-v -arch=sm_90a``) for registers and spills,
shared memory comes from the compile metadata, and ``cuobjdump --dump-sass`` of the cubin
counts HGMMA (Hopper warpgroup tensor-core) instructions of configs that require them,
and every SASS opcode a config requires.

An entry may also claim ``"programs_per_sm"``: that many blocks of it fit one SM at once
(a persistent grid sized to it), by registers and shared memory (``programs_that_fit``).

A row fails on a compile error, any register spill, shared memory above what one H200
block may use, no HGMMA where the config requires tensor cores, a required PTX
instruction or SASS opcode missing, or fewer blocks fitting an SM than it claims.

The compile itself runs in a subprocess with ``TRITON_INTERPRET=0``: under the
interpreter (how the tests run on a CPU) ``@triton.jit`` yields interpreter functions
that cannot be compiled, and the variable is read when triton is imported.

    python -m gptfast.compile_report [--json FILE] [--modules layer_norm,causal_attention]
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# H200 (sm_90): 228 KiB shared memory per SM, of which one block may use 227 KiB.
SHARED_MEMORY_LIMIT = 227 * 1024  # 232448 bytes
SM_SHARED_MEMORY = 228 * 1024  # per SM, shared by its resident blocks
BLOCK_RESERVED_SHARED = 1024  # what the driver reserves per resident block
SM_REGISTERS = 65536  # 32-bit registers per SM
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
PTXAS_ARCH = "sm_90a"


class CompileReportError(AssertionError):
    """A shipped kernel configuration failed the static checks."""


# --------------------------------------------------------------------------------------
# Checks (pure functions of a report row, so they can be tested on hand-made rows)
# --------------------------------------------------------------------------------------


def programs_that_fit(row: dict) -> int:
    """How many blocks of a compiled config one H200 SM holds at once, by registers and by
    shared memory (the occupancy calculator's rules, without the block-count limits)."""
    per_warp = -(-row["registers"] * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    by_registers = SM_REGISTERS // (per_warp * row["num_warps"])
    return min(by_registers, SM_SHARED_MEMORY // (row["shared"] + BLOCK_RESERVED_SHARED))


def row_problems(row: dict) -> list:
    """What is wrong with one report row; empty when it passes (or was skipped)."""
    if row.get("skipped"):
        return []
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    problems = []
    if row.get("spill_stores", 0) or row.get("spill_loads", 0):
        problems.append(
            f"register spills: {row.get('spill_stores', 0)} bytes stored, {row.get('spill_loads', 0)} bytes loaded"
        )
    if row.get("shared", 0) > SHARED_MEMORY_LIMIT:
        problems.append(f"shared memory {row['shared']} bytes exceeds the H200 per-block limit {SHARED_MEMORY_LIMIT}")
    if row.get("require_hgmma") and not row.get("hgmma", 0):
        problems.append("no HGMMA instructions in the SASS, but this config must use Hopper tensor cores")
    wanted = row.get("programs_per_sm")
    if wanted and programs_that_fit(row) < wanted:
        problems.append(f"{wanted} programs per SM claimed, but only {programs_that_fit(row)} fit "
                        f"({row['registers']} registers x {row['num_warps']} warps, {row['shared']} bytes shared)")
    for instruction in row.get("missing_ptx") or ():
        problems.append(f"PTX lacks {instruction}, which this config requires")
    for opcode in row.get("require_sass") or ():
        if not (row.get("sass") or {}).get(opcode, 0):
            problems.append(f"no {opcode} instructions in the SASS, but this config claims them")
    return problems


def report_failures(rows: list) -> list:
    """One message per problem, ``"module.name: problem"``, over all rows."""
    return [f"{row.get('module')}.{row.get('name')}: {p}" for row in rows for p in row_problems(row)]


def check_report(rows: list) -> None:
    """Raise :class:`CompileReportError` listing every failing row."""
    failures = report_failures(rows)
    if failures:
        raise CompileReportError("static compile report failed:\n  " + "\n  ".join(failures))


# --------------------------------------------------------------------------------------
# Compiling (runs in the worker process, where TRITON_INTERPRET is off)
# --------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str:
    """Path of an NVIDIA tool (ptxas, cuobjdump) as triton resolves it, else its wheel's copy.
    ptxas is the one triton itself runs for sm_90 (triton 3.9 and later pick a newer ptxas
    for sm_90+ than for older GPUs, matching the PTX version they emit there)."""
    try:
        import triton.knobs

        if name == "ptxas":
            try:
                from triton.backends.nvidia.compiler import get_ptxas

                return get_ptxas(TARGET[1]).path
            except ImportError:  # an older triton without get_ptxas: one ptxas for every architecture
                pass
        return getattr(triton.knobs.nvidia, name).path
    except Exception:  # older triton: fall back to the binaries shipped in the wheel
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _parse_ptxas(text: str) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` output (max over kernels)."""
    def biggest(pattern):
        return max((int(m) for m in re.findall(pattern, text)), default=0)

    return {
        "registers": biggest(r"Used (\d+) registers"),
        "spill_stores": biggest(r"(\d+) bytes spill stores"),
        "spill_loads": biggest(r"(\d+) bytes spill loads"),
        "stack_frame": biggest(r"(\d+) bytes stack frame"),
    }


def compile_config(cfg: dict, workdir: str) -> dict:
    """Compile one static config for sm_90 and measure it. Needs TRITON_INTERPRET off."""
    import triton
    from triton.backends.compiler import GPUTarget

    from gptfast.kernels._common import ast_source

    compiled = triton.compile(
        ast_source(cfg),
        target=GPUTarget(*TARGET),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    row = {"shared": int(compiled.metadata.shared),
           "missing_ptx": [i for i in cfg.get("require_ptx") or () if i not in compiled.asm["ptx"]]}

    stem = os.path.join(workdir, re.sub(r"[^A-Za-z0-9_]", "_", cfg["name"]))
    with open(stem + ".ptx", "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = subprocess.run(
        [_nvidia_tool("ptxas"), "-v", f"-arch={PTXAS_ARCH}", stem + ".ptx", "-o", stem + ".ptxas.cubin"],
        capture_output=True, text=True,
    )
    if ptxas.returncode != 0:
        raise RuntimeError(f"ptxas failed: {ptxas.stderr.strip()[-2000:]}")
    row.update(_parse_ptxas(ptxas.stdout + ptxas.stderr))

    # Disassembling takes most of a second, so only where tensor cores or opcodes are required.
    required = list(cfg.get("require_sass") or ())
    row["hgmma"] = None
    row["sass"] = {}
    if cfg.get("require_hgmma") or required:
        counts = _count_sass(compiled.asm["cubin"], stem, ["HGMMA"] + required)
        row["hgmma"] = counts["HGMMA"] if cfg.get("require_hgmma") else None
        row["sass"] = {opcode: counts[opcode] for opcode in required}
    return row


def count_opcodes(sass: str, opcodes) -> dict:
    """How many instructions of each opcode the SASS text holds. An opcode matches with
    further modifiers: ``ATOMG.E.ADD.F32`` counts ``ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU``,
    ``UTMALDG`` counts ``UTMALDG.2D``; not as part of a longer name (``RED`` does not count
    ``REDUX``). ``A|B`` counts the instructions of either (one operation that compilers
    emit as either opcode)."""
    def count(op):
        return sum(len(re.findall(rf"(?<![\w.]){re.escape(o)}(?![A-Z0-9_])", sass)) for o in op.split("|"))
    return {op: count(op) for op in opcodes}


def _count_sass(cubin: bytes, stem: str, opcodes) -> dict:
    """``count_opcodes`` of the SASS of ``cubin``."""
    with open(stem + ".cubin", "wb") as f:
        f.write(cubin)
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-sass", stem + ".cubin"], capture_output=True, text=True)
    if sass.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {sass.stderr.strip()[-2000:]}")
    return count_opcodes(sass.stdout, opcodes)


def _import_kernel_module(name: str):
    """The kernel module ``name`` (a name in gptfast.kernels, or a dotted module path),
    or None when it does not exist."""
    import gptfast  # noqa: F401  (mounts kernels/ as gptfast.kernels in a source checkout)

    qualified = name if "." in name else f"gptfast.kernels.{name}"
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as e:
        if e.name == qualified:  # the module itself is absent (not one of its imports)
            return None
        raise


# Optional functions of a kernel module whose entries the report also compiles.
_EXTRA_GROUPS = ("candidate_configs", "precision_configs")


def _report_in_this_process(modules) -> list:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptfast_compile_report_") as workdir:
        for module_name in modules:
            try:
                module = _import_kernel_module(module_name)
                if module is None:
                    rows.append({"module": module_name, "name": None, "skipped": "module not present"})
                    continue
                if not hasattr(module, "static_configs"):
                    raise AttributeError(f"kernel module {module_name} has no static_configs()")
                configs = [(cfg, False) for cfg in module.static_configs()]
                configs += [(cfg, True) for group in _EXTRA_GROUPS if hasattr(module, group)
                            for cfg in getattr(module, group)()]
            except Exception as e:  # an unimportable module is a failure, not a skip
                rows.append({"module": module_name, "name": None, "error": f"{type(e).__name__}: {e}"})
                continue
            for cfg, extra in configs:
                row = {
                    "module": module_name,
                    "name": cfg["name"],
                    "shipped": not extra,
                    "num_warps": cfg["num_warps"],
                    "num_stages": cfg["num_stages"],
                    "require_hgmma": bool(cfg.get("require_hgmma", False)),
                    "require_sass": list(cfg.get("require_sass") or ()),
                }
                if cfg.get("programs_per_sm"):  # a persistent grid's claim (see programs_that_fit)
                    row["programs_per_sm"] = cfg["programs_per_sm"]
                try:
                    row.update(compile_config(cfg, workdir))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def default_modules() -> tuple:
    import gptfast  # noqa: F401

    from gptfast.kernels._registry import KERNEL_MODULES

    return tuple(KERNEL_MODULES)


def compile_report(modules=None, timeout: float = 900) -> list:
    """Compile every static config of ``modules`` (default: ``KERNEL_MODULES``) for sm_90.

    Returns one dict per config (``module, name, shipped, num_warps, num_stages, registers,
    spill_stores, spill_loads, stack_frame, shared, hgmma, require_hgmma, missing_ptx,
    require_sass, sass`` (the count of each required SASS opcode), or
    ``error``; ``shipped`` is False for candidate and precision entries),
    each with ``problems`` (see :func:`row_problems`); absent modules give a row with
    ``skipped``. Runs the compile in a subprocess with ``TRITON_INTERPRET=0``.
    """
    modules = tuple(default_modules() if modules is None else modules)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="gptfast_compile_report_") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "gptfast.compile_report", "--worker-out", out, "--modules", ",".join(modules)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"compile report worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        row["problems"] = row_problems(row)
    return rows


def format_report(rows: list) -> str:
    """A fixed-width table of the report rows."""
    header = ("module", "config", "warps", "stages", "regs", "spill st/ld", "shared B", "HGMMA", "claimed SASS",
              "status")
    # HGMMA is counted only for configs that require tensor cores ("-" elsewhere).
    lines = []
    for row in rows:
        if row.get("skipped"):
            lines.append((row["module"], "-", "", "", "", "", "", "", "", f"skipped: {row['skipped']}"))
            continue
        problems = row.get("problems", row_problems(row))
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        if row.get("error"):
            # Errors span lines (source excerpts); the table shows the type and the last line.
            lines_of_error = [l.strip() for l in row["error"].splitlines() if l.strip()]
            brief = lines_of_error[0].split(":")[0] + ": " + lines_of_error[-1] if lines_of_error else ""
            lines.append((row["module"], str(row.get("name") or "-"), "", "", "", "", "", "", "",
                          f"FAIL: compile error: {brief[:160]}"))
            continue
        lines.append((
            row["module"], row["name"], str(row["num_warps"]), str(row["num_stages"]), str(row["registers"]),
            f"{row['spill_stores']}/{row['spill_loads']}", str(row["shared"]),
            "-" if row.get("hgmma") is None else str(row["hgmma"]),
            " ".join(f"{op}:{n}" for op, n in (row.get("sass") or {}).items()) or "-", status,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--modules",
                        help="comma-separated kernel modules (default: gptfast.kernels._registry.KERNEL_MODULES)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # internal: compile here, write rows to this file
    args = parser.parse_args(argv)
    modules = tuple(m for m in args.modules.split(",") if m) if args.modules else None

    if args.worker_out:
        rows = _report_in_this_process(modules if modules is not None else default_modules())
        with open(args.worker_out, "w") as f:
            json.dump(rows, f)
        return 0

    rows = compile_report(modules)
    print(format_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    failures = report_failures(rows)
    print(f"\n{len(rows)} rows, {len(failures)} problems (target sm_90, shared-memory limit {SHARED_MEMORY_LIMIT} B)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
