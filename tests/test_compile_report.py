"""The static compile report (gptfast.compile_report): every shipped kernel configuration,
every tuning candidate and the fp32 precision entries compile for sm_90 without spills,
within the H200's shared memory, with HGMMA where required and round-to-nearest fp32
division / square root where required; and the checks really flag what they claim to."""
import importlib
import json
import os
import textwrap

import pytest

from gptfast import compile_report as report
from gptfast.kernels._registry import KERNEL_MODULES


# The instruction each module's fp32 path must show in its PTX.
FP32_PTX = {"layer_norm": "div.rn.f32", "causal_attention": "div.rn.f32", "decode_attention": "div.rn.f32",
            "int8_linear": "fma.rn.f32", "skinny_linear": "fma.rn.f32", "linear_cross_entropy": "div.rn.f32"}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_shipped_configs_compile_cleanly_for_sm90(module):
    rows = report.compile_report([module])
    if len(rows) == 1 and rows[0].get("skipped"):
        pytest.skip(f"gptfast.kernels.{module}: {rows[0]['skipped']}")
    assert rows, f"{module}.static_configs() returned no configurations"
    report.check_report(rows)
    for row in rows:
        assert row["registers"] > 0 and row["shared"] <= report.SHARED_MEMORY_LIMIT, row
    kernels = importlib.import_module(f"gptfast.kernels.{module}")
    extra = [row["name"] for row in rows if not row["shipped"]]
    # Every tuning candidate and fp32 precision entry was compiled (and passed) too.
    assert extra == [e["name"] for e in kernels.candidate_configs() + kernels.precision_configs()]
    assert [row["name"] for row in rows if row["shipped"]] == [e["name"] for e in kernels.static_configs()]
    # The fp32 entries' PTX rounds to nearest (tl.div_rn / tl.sqrt_rn; int8_linear: IEEE
    # fp32 products, not TF32), checked by require_ptx.
    assert any(FP32_PTX[module] in e["require_ptx"] for e in kernels.precision_configs())
    # What a config claims of the SASS (tensor-memory copies, atomics) is really there.
    for row in rows:
        for opcode in row["require_sass"]:
            assert row["sass"][opcode] > 0, (row["name"], opcode)


def test_programs_that_fit_an_sm():
    """Registers are allocated per warp in 256s; each resident block costs 1 KiB of shared memory more."""
    assert report.programs_that_fit(_row(num_warps=4, registers=128, shared=0)) == 4
    assert report.programs_that_fit(_row(num_warps=4, registers=121, shared=0)) == 4  # 121 -> 128 a thread
    assert report.programs_that_fit(_row(num_warps=4, registers=129, shared=0)) == 3  # 129 -> 136
    assert report.programs_that_fit(_row(num_warps=4, registers=32, shared=113 * 1024)) == 2
    assert report.programs_that_fit(_row(num_warps=4, registers=32, shared=113 * 1024 + 1)) == 1


def test_causal_attention_variants_claim_their_instructions():
    """Every tma entry claims UTMALDG (the forward also UTMASTG), every atomic_dq entry
    fp32 atomic adds, and the plain entries claim nothing."""
    kernels = importlib.import_module("gptfast.kernels.causal_attention")
    entries = kernels.static_configs() + kernels.candidate_configs()
    tma = [e for e in entries if "_tma" in e["name"]]
    assert tma and all("UTMALDG" in e["require_sass"] for e in tma)
    assert all("UTMASTG" in e["require_sass"] for e in tma if e["name"].startswith("attention_fwd"))
    atomic = [e for e in entries if "atomic_dq" in e["name"]]
    assert atomic and all(kernels.FP32_GLOBAL_ADD in e["require_sass"] for e in atomic)
    assert all(not e["require_sass"] for e in entries if "_tma" not in e["name"] and "atomic" not in e["name"])
    # Persistent grids of two programs per SM claim that two fit (the report checks it).
    two = [e for e in entries if "_persistent_x2" in e["name"]]
    assert two and all(e["programs_per_sm"] == 2 for e in two)
    assert all("programs_per_sm" not in e for e in entries if "_persistent_x2" not in e["name"])


def test_count_opcodes_matches_whole_opcodes_with_modifiers():
    sass = """
        /*4f10*/   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR38][R40.64], R36 ;
        /*4f20*/   @P0 UTMALDG.2D [UR8], [UR14] ;
        /*4f30*/   REDUX.SUM UR4, R3 ;
        /*4f40*/   ATOMG.E.EXCH.STRONG.GPU PT, RZ, [R10], R13 ;
    """
    assert report.count_opcodes(sass, ["ATOMG.E.ADD.F32", "UTMALDG", "RED", "ATOMG", "UTMASTG"]) == {
        "ATOMG.E.ADD.F32": 1, "UTMALDG": 1, "RED": 0, "ATOMG": 2, "UTMASTG": 0}
    # Alternatives: the same fp32 add as ATOMG (old value used) or REDG (not used, triton 3.9).
    red = sass + "        /*4f50*/   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;\n"
    assert report.count_opcodes(red, ["ATOMG.E.ADD.F32|REDG.E.ADD.F32", "REDG.E.ADD.F32", "RED"]) == {
        "ATOMG.E.ADD.F32|REDG.E.ADD.F32": 2, "REDG.E.ADD.F32": 1, "RED": 0}


def _row(**fields):
    clean = {"module": "m", "name": "cfg", "num_warps": 4, "num_stages": 1, "registers": 64, "spill_stores": 0,
             "spill_loads": 0, "stack_frame": 0, "shared": 1024, "hgmma": None, "require_hgmma": False}
    return {**clean, **fields}


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"spill_stores": 8, "spill_loads": 8}, "register spills"),
        ({"spill_loads": 4}, "register spills"),
        ({"shared": report.SHARED_MEMORY_LIMIT + 1}, "shared memory 232449 bytes exceeds"),
        ({"require_hgmma": True, "hgmma": 0}, "no HGMMA"),
        ({"error": "CompilationError: boom"}, "compile error: CompilationError: boom"),
        ({"missing_ptx": ["div.rn.f32"]}, "PTX lacks div.rn.f32"),
        ({"require_sass": ["UTMALDG"], "sass": {"UTMALDG": 0}}, "no UTMALDG instructions in the SASS"),
        ({"require_sass": ["UTMALDG"]}, "no UTMALDG instructions in the SASS"),
        # 2 x 8 warps of 129 registers (136 a thread once allocated per warp) exceed 65536.
        ({"programs_per_sm": 2, "num_warps": 8, "registers": 129}, "2 programs per SM claimed, but only 1 fit"),
        ({"programs_per_sm": 2, "shared": 116 * 1024}, "2 programs per SM claimed, but only 1 fit"),
    ],
)
def test_checker_flags_bad_rows(fields, problem):
    bad = _row(name="bad", **fields)
    assert any(problem in p for p in report.row_problems(bad))
    rows = [_row(), bad, _row(name=None, skipped="module not present")]
    assert report.report_failures(rows) == [f"m.bad: {p}" for p in report.row_problems(bad)]
    with pytest.raises(report.CompileReportError, match="m.bad"):
        report.check_report(rows)


def test_checker_passes_clean_rows():
    rows = [_row(), _row(shared=report.SHARED_MEMORY_LIMIT), _row(require_hgmma=True, hgmma=24),
            _row(require_sass=["UTMALDG"], sass={"UTMALDG": 13}),
            _row(programs_per_sm=2, num_warps=8, registers=128, shared=113 * 1024),
            _row(name=None, skipped="module not present")]
    assert report.report_failures(rows) == []
    report.check_report(rows)


# A kernel module with deliberately bad configurations, compiled for real.
_BAD_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def scale_by_sum(X, Y, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        tl.store(Y + offs, x * tl.sum(x, axis=0))  # every element stays live across the sum


    def static_configs():
        sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
        return [
            # 8192 floats on one warp: 256 values a thread cannot fit 255 registers.
            {"name": "spills", "fn": scale_by_sum, "signature": sig, "constexprs": {"BLOCK": 8192},
             "num_warps": 1, "num_stages": 1, "require_hgmma": False},
            {"name": "no_tensor_cores", "fn": scale_by_sum, "signature": sig, "constexprs": {"BLOCK": 128},
             "num_warps": 4, "num_stages": 1, "require_hgmma": True},
            {"name": "fine", "fn": scale_by_sum, "signature": sig, "constexprs": {"BLOCK": 128},
             "num_warps": 4, "num_stages": 1, "require_hgmma": False},
            # fp32 multiply and sum: no division at all, so a required div.rn is missing.
            {"name": "no_div_rn", "fn": scale_by_sum, "signature": sig, "constexprs": {"BLOCK": 128},
             "num_warps": 4, "num_stages": 1, "require_hgmma": False, "require_ptx": ["div.rn.f32"]},
            # A plain load and store: no tensor-memory copy, though the entry claims one.
            {"name": "claims_tma", "fn": scale_by_sum, "signature": sig, "constexprs": {"BLOCK": 128},
             "num_warps": 4, "num_stages": 1, "require_hgmma": False, "require_sass": ["UTMALDG"]},
            {"name": "broken", "fn": scale_by_sum, "signature": {"X": "*fp32", "BLOCK": "constexpr"},
             "constexprs": {"BLOCK": 128}, "num_warps": 4, "num_stages": 1, "require_hgmma": False},
        ]
''')


def test_report_flags_real_compiles_and_skips_missing_modules(tmp_path, monkeypatch, capsys):
    package = tmp_path / "report_test_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text(_BAD_KERNELS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "report.json"
    # A dotted name is a full module path; a plain one is looked up in gptfast.kernels.
    status = report.main(["--modules", "report_test_kernels.bad,no_such_kernels", "--json", str(out)])
    assert status == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "skipped: module not present" in printed

    rows = {row["name"] or row["module"]: row for row in json.loads(out.read_text())}
    assert rows["spills"]["spill_stores"] > 0 and any("register spills" in p for p in rows["spills"]["problems"])
    assert rows["no_tensor_cores"]["hgmma"] == 0 and any("HGMMA" in p for p in rows["no_tensor_cores"]["problems"])
    assert rows["fine"]["problems"] == [] and rows["fine"]["registers"] > 0 and rows["fine"]["spill_stores"] == 0
    assert "error" in rows["broken"] and rows["broken"]["problems"]
    assert rows["no_div_rn"]["problems"] == ["PTX lacks div.rn.f32, which this config requires"]
    assert rows["claims_tma"]["sass"] == {"UTMALDG": 0}
    assert rows["claims_tma"]["problems"] == ["no UTMALDG instructions in the SASS, but this config claims them"]
    assert rows["no_such_kernels"]["skipped"] == "module not present" and rows["no_such_kernels"]["problems"] == []
