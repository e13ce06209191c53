"""The house's floors: every import of gptfast (those inside functions too) goes down or
sideways in the layer order that README.md writes under "### Layers", and no imports go
round in a circle.

Imports are read with ``ast`` from the source files, not by importing them, so an import
that runs only on one path (a lazy one inside a function, a CUDA-only branch) counts the
same as one at the top of a file.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_TOP_LEVEL_MODULES = 15
MAX_MODEL_LINES = 350


def read_layers(text: str) -> list:
    """The README's layer list: one list of module names per numbered line under
    ``### Layers``, bottom layer first."""
    section = text.split("### Layers", 1)
    if len(section) != 2:
        raise AssertionError("README.md has no '### Layers' section")
    layers = []
    for line in section[1].splitlines():
        if line.startswith("#"):
            break
        match = re.match(r"\s*(\d+)\.\s", line)
        if match:
            if int(match.group(1)) != len(layers) + 1:
                raise AssertionError(f"README.md layer {match.group(1)} is out of order: {line!r}")
            layers.append(re.findall(r"`(gptfast[\w.]*)`", line))
    return layers


def source_modules() -> dict:
    """Module name -> source file, for gptfast/ and kernels/ (installed as gptfast.kernels)."""
    modules = {}
    for base, package in ((ROOT / "gptfast", "gptfast"), (ROOT / "kernels", "gptfast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    # kernels/ has no __init__.py (it must never shadow an installed `kernels`): gptfast mounts
    # it as a package; its docstring and module list live in _registry.py.
    modules.setdefault("gptfast.kernels", ROOT / "kernels" / "_registry.py")
    return modules


def imports_of(name: str, path: Path, modules: dict) -> set:
    """The gptfast modules that ``name`` (at ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from package import submodule` imports the submodule; `from module import name` the module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            if target == "kernels" or target.startswith("kernels."):  # kernels/ importing itself by path
                target = "gptfast." + target
            if target.split(".")[0] == "gptfast":
                while target not in modules and "." in target:  # `import gptfast.ops.x` of a name, not a file
                    target = target.rsplit(".", 1)[0]
                found.add(target)
    found.discard(name)
    return found


def layer_of(module: str, layers: list) -> int:
    """The layer of the longest README name that is ``module`` or a package above it."""
    best, best_len = None, -1
    for index, names in enumerate(layers):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph():
    modules = source_modules()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_readme_names_every_module_once(graph):
    modules, _ = graph
    layers = read_layers(README.read_text())
    assert len(layers) >= 5
    names = [n for layer in layers for n in layer]
    assert len(names) == len(set(names)), f"a name stands in two layers: {sorted(n for n in names if names.count(n) > 1)}"
    unknown = [n for n in names if n not in modules]
    assert not unknown, f"README.md names layers for modules that do not exist: {unknown}"
    unplaced = sorted(m for m in modules if layer_of(m, layers) is None)
    assert not unplaced, f"modules with no layer in README.md's '### Layers': {unplaced}"


def test_every_import_goes_down_or_sideways(graph):
    modules, imports = graph
    layers = read_layers(README.read_text())
    upward = []
    for name, targets in sorted(imports.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(name, layers):
                upward.append(f"{name} (layer {layer_of(name, layers) + 1}) imports {target} "
                              f"(layer {layer_of(target, layers) + 1})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circle(graph):
    _, imports = graph
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in imports.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(imports):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_package_root_imports_nothing_of_gptfast(graph):
    """``import gptfast`` stays cheap and sits at the bottom: its public names
    (gptfast.GPT, gptfast.generate, ...) resolve on first use, not at import."""
    _, imports = graph
    assert imports["gptfast"] == set()


def test_reader_sized_rooms():
    top = sorted(p.name for p in (ROOT / "gptfast").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in gptfast/: {top}"
    model_lines = len((ROOT / "gptfast" / "model.py").read_text().splitlines())
    assert model_lines < MAX_MODEL_LINES, f"gptfast/model.py has {model_lines} lines"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks above can fail: a module on a low floor importing one on a high floor
    is caught, and so is a circle."""
    layers = [["gptfast.low"], ["gptfast.high"]]
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from gptfast.high import thing\n")
    modules = {"gptfast.low": low, "gptfast.high": tmp_path / "high.py"}
    assert imports_of("gptfast.low", low, modules) == {"gptfast.high"}
    assert layer_of("gptfast.high", layers) > layer_of("gptfast.low", layers)
