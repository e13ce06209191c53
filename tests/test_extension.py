"""The C++ extension's loader (gptfast.runtime.extension): the Python-twin fallback, JIT builds,
build flags shared with setup.py, build locks that must never hang, and a status line
that builds nothing."""
import ast
import fcntl
import os
import subprocess
import sys
import warnings

import pytest

from gptfast.runtime import extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the extension loader ----------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    extension.reset_extension_cache()
    yield monkeypatch
    monkeypatch.undo()
    extension.reset_extension_cache()


def test_no_ext_env_falls_back_to_twin_with_warning(fresh_loader):
    fresh_loader.setenv("GPTFAST_NO_EXT", "1")
    with pytest.warns(extension.SamplingExtensionWarning, match="GPTFAST_NO_EXT=1.*Python twin"):
        assert extension.load_extension() is None
    assert "Python twin" in extension.extension_status()
    from gptfast.generation.engines import get_engine

    assert get_engine("auto").name == "python"
    with pytest.raises(RuntimeError, match="unavailable"):
        get_engine("cpp")


def test_failed_build_falls_back_with_one_line_warning(fresh_loader, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source is broken on purpose\n")
    fresh_loader.delenv("GPTFAST_NO_EXT", raising=False)
    fresh_loader.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    fresh_loader.setattr(extension, "_prebuilt", lambda: (None, "gptfast._C not built"))
    fresh_loader.setattr(extension, "source_files", lambda: [str(broken)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load_extension() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, extension.SamplingExtensionWarning)]
    assert len(messages) == 1 and "JIT build failed" in messages[0] and "\n" not in messages[0]


def mini_source(tmp_path, monkeypatch):
    """A small stand-in for csrc/ (the real one takes minutes to compile), with the JIT
    cache under tmp_path."""
    source = tmp_path / "mini.cpp"
    source.write_text(
        "#include <pybind11/pybind11.h>\n"
        f"PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.attr(\"API_VERSION\") = {extension.EXTENSION_API_VERSION}; }}\n"
    )
    monkeypatch.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    return source


def test_jit_build_is_announced_cached_and_version_checked(tmp_path, monkeypatch, capfd):
    # The loader's JIT path on a small stand-in source (the real one takes minutes to
    # compile): a visible message on the first build, none when the cache has it.
    source = mini_source(tmp_path, monkeypatch)
    module, status = extension._jit([str(source)])
    assert module.API_VERSION == extension.EXTENSION_API_VERSION and str(tmp_path / "cache") in status
    assert "building the C++ sampling extension" in capfd.readouterr().err
    extension._jit([str(source)])
    assert "building" not in capfd.readouterr().err


def test_stale_torch_build_lock_is_removed_not_waited_on(tmp_path, monkeypatch):
    # A build killed by a timeout leaves torch's `lock` file; torch would wait on it
    # forever. In a subprocess bounded by `timeout`: the loader must remove it and load.
    source = mini_source(tmp_path, monkeypatch)
    _, build_dir = extension._jit_target([str(source)])
    os.makedirs(build_dir)
    (tmp_path / "cache").joinpath(os.path.basename(build_dir), "lock").write_text("")  # the killed build's baton
    code = f"from gptfast.runtime import extension; print(extension._jit([{str(source)!r}])[0].API_VERSION)"
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run(["timeout", "300", sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(extension.EXTENSION_API_VERSION)
    assert "stale build lock" in run.stderr and not os.path.exists(os.path.join(build_dir, "lock"))


def test_a_live_build_is_waited_for_with_a_limit_then_the_twin_serves(fresh_loader, tmp_path):
    fresh_loader.delenv("GPTFAST_NO_EXT", raising=False)
    fresh_loader.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    fresh_loader.setenv("GPTFAST_EXT_LOCK_TIMEOUT", "0.5")
    fresh_loader.setattr(extension, "_prebuilt", lambda: (None, "gptfast._C not built"))
    _, build_dir = extension._jit_target(extension.source_files())
    os.makedirs(build_dir)
    with open(os.path.join(build_dir, "gptfast.lock"), "a") as held:  # another build, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert extension.load_extension() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, extension.SamplingExtensionWarning)]
    assert len(messages) == 1 and "another process" in messages[0] and "GPTFAST_EXT_LOCK_TIMEOUT" in messages[0]
    assert "Python twin" in extension.extension_status()


def test_lock_timeout_setting_is_validated(fresh_loader):
    fresh_loader.setenv("GPTFAST_EXT_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GPTFAST_EXT_LOCK_TIMEOUT.*'soon'"):
        extension._lock_timeout()


def test_status_and_gptfast_info_build_nothing(fresh_loader, tmp_path, capsys):
    fresh_loader.delenv("GPTFAST_NO_EXT", raising=False)
    fresh_loader.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    fresh_loader.setattr(extension, "_prebuilt", lambda: (None, "gptfast._C not built"))

    def no_build(sources):
        raise AssertionError("a status query must not build")

    fresh_loader.setattr(extension, "_jit", no_build)
    assert "not built yet" in extension.extension_status(build=False)
    from gptfast.commands import info

    assert info.run(None) == 0
    assert "sampler      C++ extension not built yet" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    fresh_loader.setenv("GPTFAST_NO_EXT", "1")
    assert extension.extension_status(build=False) == "Python twin (GPTFAST_NO_EXT=1)"


def test_setup_py_builds_with_the_jit_flags():
    # setup.py cannot import gptfast: it repeats the list, which must stay identical.
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    flags = [ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
             for k in node.keywords if k.arg == "extra_compile_args"]
    assert flags == [extension.EXTENSION_CFLAGS] and "-g0" in extension.EXTENSION_CFLAGS


def test_module_check_reports_the_built_extension():
    # `python -m gptfast.runtime.extension`: the check after `setup.py build_ext` (builds nothing).
    module, line = extension._prebuilt()
    env = {k: v for k, v in os.environ.items() if k != "GPTFAST_NO_EXT"}
    run = subprocess.run([sys.executable, "-m", "gptfast.runtime.extension"], capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=REPO), timeout=120)
    assert run.returncode == (0 if module is not None else 1), run.stdout + run.stderr
    assert run.stdout.strip() == (line if module is not None else run.stdout.strip())
