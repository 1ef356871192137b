"""The package's layout rules (docs/design.md §3-§4), checked on its source: imports between its
modules form no cycle, no function imports a package module except the lazy loads listed here with
their reason, and no product function grows past the length a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import attrspace

PACKAGE = Path(attrspace.__file__).parent
# Imports inside functions that are lazy loads, not cycle dodges: (module, imported) -> why.
LAZY = {
    # The CLI imports each command's modules when the command runs: `attrspace --help` and argument
    # errors answer without importing torch-heavy pipelines.
    "attrspace.cli.main": "command modules loaded when the command runs",
    "attrspace.cli.args": "command modules loaded when the command runs",
    # mine_peft reaches the pipeline's report modules (about 1 s to import): `import attrspace`
    # does not pay for them until attrspace.mine_peft is first used (a module __getattr__).
    "attrspace": "mine_peft loaded on first use",
    "attrspace.cli.own_data": "command modules loaded when the command runs",
    # The VGGT-1B default of the parameter table is built only when no model is given.
    "attrspace.models.vggt.params": "the default model is built on demand",
}
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    # The Triton kernels (kernels/ at the repository's top, installed as attrspace.kernels) import
    # nothing of the package and hold one kernel body per function: checked by tests/kernels/.
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "kernels"]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in _sources():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def _targets(node: ast.Import | ast.ImportFrom, modules: dict) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {n for n in names if n in modules}


def _module_level_imports(tree: ast.Module, modules: dict) -> set[str]:
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _targets(node, modules)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found |= _targets(inner, modules)
    return found


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_module_imports_form_no_cycle():
    modules = _modules()
    graph = {}
    for name, tree in modules.items():
        # Importing a module runs its packages' __init__ first: those are edges too.
        edges = _module_level_imports(tree, modules)
        graph[name] = {p for e in edges for p in [*_parents(e), e] if p in modules and p != name}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and nxt not in _parents(node):
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_functions_import_package_modules_only_as_listed_lazy_loads():
    modules = _modules()
    offenders = []
    for name, tree in modules.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and _targets(node, modules):
                    if name not in LAZY:
                        offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"imports inside functions: {offenders}"


def test_no_product_function_is_longer_than_a_reader_can_hold():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_top_level_holds_only_the_entrance_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    expected = ["__init__.py", "__main__.py", "distributed.py", "geometry.py", "testing.py"]
    assert loose == expected
