"""Where gptfast's kernels and C++ sources come from in a checkout and in a built wheel,
and that the checkout's top-level ``kernels/`` never shadows an installed distribution
named ``kernels`` (Hugging Face's, which transformers >= 5.25 imports).

Each check runs in a subprocess started the way the collision happens: from the
repository root, whose directory is then first on ``sys.path``.
"""
import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "csrc", "*.cpp")))
KERNEL_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "kernels", "*.py")))
TUNED_TABLES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "kernels", "tuned", "*.json")))


def stand_in_kernels(site):
    """A site directory holding a distribution named ``kernels`` (version 0.0.0) and a
    module that imports from it the way transformers does."""
    package = site / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""stand-in for Hugging Face\'s kernels."""\n'
                                         "CUDAProperties = 'stand-in CUDAProperties'\n")
    info = site / "kernels-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.0\n")
    (site / "hf_like.py").write_text("from kernels import CUDAProperties\n")
    return site


def run_python(code, cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), TRITON_INTERPRET="1",
               GPTFAST_NO_EXT="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_kernels_directory_is_a_namespace_portion():
    # An __init__.py would make kernels/ a regular package, which wins over any installed
    # 'kernels' whenever the repository root is on sys.path.
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))
    assert "_registry.py" in KERNEL_FILES


@pytest.mark.parametrize("gptfast_first", [True, False], ids=["gptfast-first", "kernels-first"])
def test_checkout_does_not_shadow_an_installed_kernels(tmp_path, gptfast_first):
    site = stand_in_kernels(tmp_path / "site")
    first, second = ("import gptfast", "import kernels") if gptfast_first else ("import kernels", "import gptfast")
    out = run_python(f"""
        import importlib.metadata, os
        {first}
        {second}
        import gptfast.kernels.layer_norm
        import hf_like
        from gptfast.kernels._registry import KERNEL_MODULES
        print(os.path.dirname(kernels.__file__))
        print(os.path.dirname(gptfast.kernels.layer_norm.__file__))
        print(hf_like.CUDAProperties)
        print(importlib.metadata.version("kernels"))
        print(gptfast.kernels.__name__, "layer_norm" in KERNEL_MODULES, gptfast.kernels.__doc__.split(chr(10))[0])
    """, cwd=REPO, pythonpath=[site])
    lines = out.splitlines()
    assert lines[0] == str(site / "kernels")
    assert lines[1] == os.path.join(REPO, "kernels")
    assert lines[2] == "stand-in CUDAProperties"
    assert lines[3] == "0.0.0"
    assert lines[4].startswith("gptfast.kernels True Triton kernels of gptfast")


def test_checkout_finds_its_sources():
    out = run_python("""
        from gptfast.runtime import extension, paths
        print(paths.checkout_root())
        print(paths.source_dir("kernels"))
        print(" ".join(extension.source_files()))
    """, cwd=REPO, pythonpath=[])
    root, kernels_dir, sources = out.splitlines()
    assert root == REPO and kernels_dir == os.path.join(REPO, "kernels")
    assert sources.split() == [os.path.join(REPO, "csrc", name) for name in CSRC]


def test_source_dir_rejects_other_names():
    from gptfast.runtime import paths

    with pytest.raises(ValueError, match="name must be 'kernels' or 'csrc', got 'tests'"):
        paths.source_dir("tests")


def test_no_module_imports_a_top_level_kernels():
    import ast

    offenders = []
    for directory in ("gptfast", "kernels", "tests", "benchmarks"):
        for path in glob.glob(os.path.join(REPO, directory, "**", "*.py"), recursive=True):
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path}:{node.lineno}" for n in names if n and n.split(".")[0] == "kernels"]
    assert not offenders, offenders


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A non-editable wheel of this tree (without the compiled extension), built from a
    copy so that the build leaves nothing in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("gptfast", "kernels", "csrc"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    env = dict(os.environ, GPTFAST_NO_BUILD_EXT="1")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = glob.glob(str(tmp / "dist" / "gptfast-*.whl"))
    return path


def test_wheel_carries_kernels_csrc_and_tuned_tables(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"gptfast/kernels/{n}" for n in KERNEL_FILES} <= names
    assert {f"gptfast/kernels/tuned/{n}" for n in TUNED_TABLES} <= names
    assert {f"gptfast/csrc/{n}" for n in CSRC} <= names and CSRC
    # Nothing top-level but gptfast and its metadata: never a 'kernels' or 'csrc' of its own.
    assert {n.split("/")[0] for n in names} == {"gptfast", "gptfast-0.1.0.dist-info"}
    assert "gptfast/kernels/__init__.py" not in names


def test_installed_wheel_uses_its_own_kernels_and_sources(wheel, tmp_path):
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)  # a pure-Python wheel installs by unpacking
    site = stand_in_kernels(tmp_path / "site")
    # The checkout last on sys.path must neither shadow the stand-in nor lend the
    # installed gptfast its kernels or sources.
    out = run_python("""
        import os
        import gptfast, kernels, hf_like
        import gptfast.kernels.layer_norm
        from gptfast.runtime import extension, paths
        from gptfast.kernels import _tuned
        print(os.path.dirname(gptfast.__file__))
        print(os.path.dirname(gptfast.kernels.layer_norm.__file__))
        print(os.path.dirname(kernels.__file__))
        print(paths.checkout_root())
        print(" ".join(extension.source_files()))
        print(" ".join(sorted(os.path.basename(t["path"]) for t in _tuned.load_tables())))
    """, cwd=tmp_path, pythonpath=[target, site, REPO])
    package, kernels_dir, stand_in, root, sources, tables = out.splitlines()
    assert package == str(target / "gptfast")
    assert kernels_dir == str(target / "gptfast" / "kernels")
    assert stand_in == str(site / "kernels")
    assert root == "None"
    assert sources.split() == [str(target / "gptfast" / "csrc" / n) for n in CSRC]
    assert tables.split() == TUNED_TABLES
