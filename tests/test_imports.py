"""The package's import graph: no cycles, no upward imports (docs/architecture.md).

Every ``import`` counts, at module level and inside functions: a function-local import is a
coupling too, only a later one. Importing ``a.b.c`` also runs the ``__init__`` of each package
above it that the importer is not already inside, so those count as imports of their own.
``if TYPE_CHECKING:`` blocks never run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zerotune"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    where: str  # file:line


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """What ``name`` imports inside the package, with the package inits each import runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: dict[tuple[str, str], Import] = {}
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else names of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] != "zerotune":
                continue
            while target not in known:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            runs = [".".join(parts[:i]) for i in range(1, len(parts))] + [target]
            for module in runs:  # the package inits above the target that the importer is not inside
                if module != name and not (name + ".").startswith(module + "."):
                    found.setdefault((module, f"{node.lineno}"), Import(name, module, f"{shown}:{node.lineno}"))
    return list(found.values())


def graph() -> list[Import]:
    known = modules()
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def find_cycle(edges: list[Import]) -> list[Import] | None:
    """One import cycle as its chain of imports, or None."""
    out: dict[str, list[Import]] = {}
    for e in edges:
        out.setdefault(e.source, []).append(e)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[Import] = []

    def visit(node: str) -> list[Import] | None:
        state[node] = 1
        for e in out.get(node, []):
            if state.get(e.target) == 1:
                start = next(i for i, p in enumerate(path) if p.source == e.target) if e.target != node else len(path)
                return path[start:] + [e]
            if e.target not in state:
                path.append(e)
                cycle = visit(e.target)
                if cycle:
                    return cycle
                path.pop()
        state[node] = 2
        return None

    for node in sorted(out):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def under(module: str, *packages: str) -> bool:
    return any(module == f"zerotune.{p}" or module.startswith(f"zerotune.{p}.") for p in packages)


# (importer, what it may not import, why): the layers of docs/architecture.md
FORBIDDEN = [
    (("errors", "files", "spec", "units"), ("*",), "the bottom layer imports nothing of the package but errors"),
    (("models",), ("data", "config", "train", "finetune", "run", "load", "compress", "interop", "evaluate", "cli"),
     "a model is built from plain ints and a DataInfo (zerotune.spec)"),
    (("data",), ("models", "train", "finetune", "run", "load", "evaluate", "interop", "compress"),
     "data is below the models and the loop"),
    (("config",), ("train", "finetune", "data", "run", "load"), "config sits below data and the loop"),
    (("run",), ("finetune", "compress", "train", "load", "interop", "evaluate", "data", "models"),
     "run.py is the run folder only"),
    (("interop",), ("train",), "formats do not depend on the loop"),
    (("models", "data", "config", "run", "train", "finetune", "evaluate", "compress", "interop", "load", "generate"),
     ("serve",), "the server sits on top of loading and generation"),
]


def layer_breaks(edges: list[Import]) -> list[str]:
    problems = []
    for e in edges:
        for importers, banned, why in FORBIDDEN:
            if not under(e.source, *importers):
                continue
            if (e.target != "zerotune.errors") if banned == ("*",) else under(e.target, *banned):
                problems.append(f"{e.where}: {e.source} imports {e.target} ({why})")
        if e.target in ("zerotune.cli", "zerotune") and e.source not in ("zerotune.cli", "zerotune.__main__"):
            problems.append(f"{e.where}: {e.source} imports {e.target} (only the command line is above it)")
    return problems


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"{e.target} ({e.where})" for e in cycle)


def test_no_module_imports_upward():
    problems = layer_breaks(graph())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    a = Import("zerotune.models.x", "zerotune.data.y", "x.py:3")
    b = Import("zerotune.data.y", "zerotune.models.x", "y.py:9")
    assert find_cycle([a, b]) == [b, a]  # from the first module in name order
    assert layer_breaks([a]) == ["x.py:3: zerotune.models.x imports zerotune.data.y "
                                 "(a model is built from plain ints and a DataInfo (zerotune.spec))"]


def test_function_level_imports_and_package_inits_count(tmp_path):
    known = {"zerotune": Path(), "zerotune.a": Path(), "zerotune.a.b": Path(), "zerotune.c": Path()}
    source = tmp_path / "c.py"
    source.write_text("def f():\n    from zerotune.a.b import g\n")
    found = imports_of("zerotune.c", source, known)
    assert {i.target for i in found} == {"zerotune.a", "zerotune.a.b"}  # the init of zerotune.a runs too


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["finetune", "--help"], ["export", "--help"]])
def test_help_imports_neither_the_models_nor_matplotlib(argv):
    code = ("import sys; from zerotune import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('zerotune.', 'matplotlib', 'transformers', "
            "'torch'))))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert loaded == ["zerotune.cli", "zerotune.errors"], loaded
