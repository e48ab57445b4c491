"""Imports point one way: every import of every module in our packages, walked with `ast`.

The rule is one table, `ALLOWED`: which of our packages each package may import. Every
import counts, wherever it sits (module level, inside a function, under `if
TYPE_CHECKING:`), absolute or relative, and `importlib.import_module("literal")` too. An
edge that is not in the table points the wrong way and fails the test, with the exceptions
named in `DEFERRED` (a command-line entry point handing a whole command to a package above
it, from inside a function only). `NEVER_LOADS` names third-party packages a package must
not pull in, directly or through anything of ours it imports; the same is checked at run
time in a fresh interpreter (`sys.modules`), which also catches a third-party dependency that
loads torch behind our back. `SUBPACKAGE_RULES` holds the rules inside a package; each
applies once both of its sub-packages exist.

The checker itself is tested on a small synthetic tree with wrong-way edges (in tmp_path),
so that this test cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "scheduler", "kvcache", "attention", "model", "loadtest", "bench")

# What each package may import of ours, besides itself. Anything else is a wrong-way edge.
ALLOWED: dict[str, frozenset[str]] = {
    # the bottom: layouts and index math, the page pool, the allocator, the radix cache
    "kvcache": frozenset(),
    # pages from the allocator and prefix matches from the radix cache (both torch-free:
    # NEVER_LOADS below follows the scheduler's imports into kvcache)
    "scheduler": frozenset({"kvcache"}),
    # kernels and backends read the pool in its layout
    "attention": frozenset({"kvcache"}),
    # the runner and the sampler read `scheduler.request.SamplingParams`, a plain record of
    # the pure-Python scheduler (a leaf but for kvcache): no cycle, no torch brought in
    "model": frozenset({"attention", "kvcache", "scheduler"}),
    # the engine drives the scheduler, the model runner, the backends and the pool
    "server": frozenset({"scheduler", "model", "attention", "kvcache"}),
    # a plain HTTP client of the server: none of the engine
    "loadtest": frozenset(),
    # benchmarks and experiments sit on top and may import anything
    "bench": frozenset(PACKAGES),
}

# (importing module, imported package) -> why. Entry points of the `attnserve` command that
# run another package's command; the import must sit inside a function, so importing the
# module never loads that package. No other module of the package may import it.
DEFERRED: dict[tuple[str, str], str] = {
    ("server.cli", "bench"): "`attnserve bench ...` runs bench.cli (bench sits on top)",
    ("server.cli", "loadtest"): "`attnserve loadtest ...` runs loadtest.cli",
}

# Third-party packages a package must never load, itself or through anything of ours.
NEVER_LOADS: dict[str, frozenset[str]] = {
    "scheduler": frozenset({"torch", "triton", "numpy"}),  # pure Python
    "loadtest": frozenset({"torch", "triton"}),  # runs on a machine without the engine
}

# (importer, imported): sub-packages of one package where the first must never import the
# second. A rule applies once both sub-packages exist as folders of modules.
SUBPACKAGE_RULES: tuple[tuple[str, str], ...] = (
    ("server.engine", "server.api"),  # server.api may import server.engine, never the reverse
    # `attnserve router` starts workers as processes: neither side of a worker imports it
    ("server.engine", "server.router"),
    ("server.api", "server.router"),
)


@dataclass(frozen=True)
class Rules:
    allowed: dict[str, frozenset[str]]
    deferred: dict[tuple[str, str], str] = field(default_factory=dict)
    never_loads: dict[str, frozenset[str]] = field(default_factory=dict)
    subpackage_rules: tuple[tuple[str, str], ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(self.allowed)


RULES = Rules(ALLOWED, DEFERRED, NEVER_LOADS, SUBPACKAGE_RULES)


# ----------------------------------------------------------------------------- the scan


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module (absolute), or a candidate `module.name`
    lineno: int
    deferred: bool  # inside a function body: runs when called, not when imported
    candidate: bool = False  # `from X import name`: X.name, which may be a module or not


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # function nesting
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST, candidate: bool = False) -> None:
        self.found.append(Import(self.module, target, node.lineno, self.depth > 0, candidate))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level - 1 >= len(base):
                raise ValueError(f"{self.module}:{node.lineno}: relative import above the top")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self._add(target, node)
        for alias in node.names:
            if alias.name != "*":
                self._add(f"{target}.{alias.name}", node, candidate=True)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and not node.args[0].value.startswith(".")):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def scan(root: Path, packages: tuple[str, ...]) -> dict[str, list[Import]]:
    """Every module of `packages` under `root` -> the imports it makes."""
    modules: dict[str, list[Import]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, is_package = _module_name(root, path)
            visitor = _ImportVisitor(name, is_package)
            visitor.visit(ast.parse(path.read_text(), filename=str(path)))
            modules[name] = visitor.found
    return modules


def _top(name: str) -> str:
    return name.partition(".")[0]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# ----------------------------------------------------------------------------- the check


def check_tree(root: Path, rules: Rules) -> list[str]:
    """Every import under `root` that breaks `rules`, one line each (empty: all is well)."""
    modules = scan(root, rules.packages)
    problems: list[str] = []
    for module, imports in modules.items():
        src = _top(module)
        for imp in imports:
            dst = _top(imp.target)
            if imp.candidate or dst == src or dst not in rules.allowed:
                continue  # candidates repeat their module's edge; third party is NEVER_LOADS'
            where = f"{module}:{imp.lineno} imports {imp.target}"
            if dst in rules.allowed[src]:
                continue
            if (module, dst) in rules.deferred:
                if not imp.deferred:
                    problems.append(f"{where}: {src} -> {dst} is allowed here only inside a "
                                    f"function ({rules.deferred[(module, dst)]})")
                continue
            problems.append(f"{where}: {src} -> {dst} points the wrong way (not in ALLOWED)")
    problems += _subpackage_problems(root, modules, rules)
    problems += _never_loads_problems(modules, rules)
    return problems


def _active_subpackage_rules(root: Path, rules: Rules) -> list[tuple[str, str]]:
    def exists(name: str) -> bool:  # a folder of modules (with or without __init__.py)
        folder = root / name.replace(".", "/")
        return folder.is_dir() and any(folder.glob("*.py"))

    return [(a, b) for a, b in rules.subpackage_rules if exists(a) and exists(b)]


def _subpackage_problems(root: Path, modules: dict[str, list[Import]], rules: Rules) -> list[str]:
    problems = []
    for importer, imported in _active_subpackage_rules(root, rules):
        for module, imports in modules.items():
            if not _within(module, importer):
                continue
            for imp in imports:
                if _within(imp.target, imported) and not imp.candidate:
                    problems.append(f"{module}:{imp.lineno} imports {imp.target}: {importer} "
                                    f"must never import {imported}")
    return problems


def _never_loads_problems(modules: dict[str, list[Import]], rules: Rules) -> list[str]:
    """Follow each package's imports (any nesting) through our modules, parents' __init__
    included, and report a forbidden third-party package with the chain that reaches it."""
    problems = []
    for package, forbidden in rules.never_loads.items():
        start = [m for m in modules if _top(m) == package]
        came_from: dict[str, str | None] = dict.fromkeys(start)
        queue = deque(start)
        while queue:
            module = queue.popleft()
            for imp in modules[module]:
                if _top(imp.target) in forbidden and not imp.candidate:
                    chain = [module]
                    while came_from[chain[-1]] is not None:
                        chain.append(came_from[chain[-1]])  # type: ignore[arg-type]
                    problems.append(f"{package} loads {imp.target}: "
                                    f"{' -> '.join(reversed(chain))}:{imp.lineno}")
                parts = imp.target.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c runs a and a.b first
                    name = ".".join(parts[:i])
                    if name in modules and name not in came_from:
                        came_from[name] = module
                        queue.append(name)
    return problems


# ----------------------------------------------------------------------------- the project


def test_every_import_points_the_allowed_way() -> None:
    problems = check_tree(ROOT, RULES)
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def test_the_scan_sees_the_project() -> None:
    """Guards against a vacuous pass: each package is found and known edges are seen, the
    deferred ones as deferred."""
    modules = scan(ROOT, PACKAGES)
    assert {_top(m) for m in modules} == set(PACKAGES)
    edges = {(m, i.target, i.deferred) for m, imps in modules.items() for i in imps}
    assert ("server.cli", "bench.cli", True) in edges
    assert ("server.cli", "loadtest.cli", True) in edges
    assert ("scheduler.scheduler", "kvcache.allocator", False) in edges
    assert any(m.startswith("bench.attention.") and _top(t) == "attention" for m, t, _ in edges)
    assert set(ALLOWED) == set(PACKAGES)
    assert all(dst in PACKAGES for dsts in ALLOWED.values() for dst in dsts)


def test_the_subpackage_rule_applies_once_both_sides_exist() -> None:
    active = _active_subpackage_rules(ROOT, RULES)
    both = all(any((ROOT / "server" / sub).glob("*.py")) for sub in ("engine", "api"))
    assert both and ("server.engine", "server.api") in active


def test_the_http_side_uses_only_the_engines_public_interface() -> None:
    """server.api imports the package server.engine (its __init__), never a module in it."""
    modules = scan(ROOT, PACKAGES)
    engine_dir = ROOT / "server" / "engine"

    def is_engine_module(target: str) -> bool:  # `from server.engine import X`: X a name or module
        sub = target.removeprefix("server.engine.").split(".")[0]
        return _within(target, "server.engine") and target != "server.engine" and (
            (engine_dir / f"{sub}.py").exists() or (engine_dir / sub).is_dir())

    reaching_in = [f"{m} imports {i.target}" for m, imps in modules.items()
                   if _within(m, "server.api") for i in imps if is_engine_module(i.target)]
    assert not reaching_in, reaching_in
    assert any(i.target == "server.engine" for m, imps in modules.items()
               if _within(m, "server.api") for i in imps)


def _loaded_by(modules: list[str]) -> set[str]:
    """Top-level names in sys.modules after a fresh interpreter imports `modules`."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _reachable(package: str) -> set[str]:
    seen, todo = {package}, [package]
    while todo:
        for dst in ALLOWED[todo.pop()]:
            if dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


@pytest.mark.parametrize("package", sorted(NEVER_LOADS))
def test_importing_a_leaf_package_loads_nothing_it_must_not(package: str) -> None:
    """Run time: import every module of the package (but __main__) in a fresh interpreter;
    none of NEVER_LOADS and none of our packages beyond its ALLOWED edges may be loaded."""
    names = sorted(m for m in scan(ROOT, (package,)) if not m.endswith("__main__"))
    if package == "loadtest":  # the modules the load generator is made of
        assert {f"loadtest.{m}" for m in ("cli", "client", "runner", "sweep", "stats")} <= set(names)
    loaded = _loaded_by(names)
    assert package in loaded
    if package == "loadtest":
        assert "httpx" in loaded
    forbidden = NEVER_LOADS[package] | (set(PACKAGES) - _reachable(package))
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_importing_the_cli_loads_no_deferred_package() -> None:
    loaded = _loaded_by(["server.cli"])
    assert "server" in loaded
    assert not loaded & {dst for _, dst in DEFERRED}, loaded & {dst for _, dst in DEFERRED}


# ----------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SYNTHETIC = Rules(
    allowed={"low": frozenset(), "mid": frozenset({"low"}), "top": frozenset({"mid", "low"}),
             "pure": frozenset({"low"})},
    deferred={("mid.cli", "top"): "mid's command runs top"},
    never_loads={"pure": frozenset({"torch"})},
    subpackage_rules=(("mid.engine", "mid.http"),),
)


def test_checker_passes_a_tree_that_keeps_the_rules(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/plain.py": "import json\n",
        "mid/__init__.py": "from low import plain\n",
        "mid/cli.py": "def run():\n    from top.app import main\n    return main()\n",
        "mid/engine/__init__.py": "",
        "mid/http/__init__.py": "from ..engine import core\nfrom mid.engine import core as c\n",
        "mid/engine/core.py": "import torch\n",
        "top/__init__.py": "",
        "top/app.py": "import mid.cli\nfrom low.plain import json\n",
        "pure/__init__.py": "from low import plain\n",
    })
    assert check_tree(root, SYNTHETIC) == []


def test_checker_fails_on_wrong_way_edges(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        # a wrong-way edge inside a function still counts
        "low/plain.py": "def f():\n    from mid import cli\n    return cli\n",
        "low/heavy.py": "import torch\n",
        "low/typed.py": ("from typing import TYPE_CHECKING\n"
                         "if TYPE_CHECKING:\n    import top.app\n"),
        "low/dynamic.py": "import importlib\nM = importlib.import_module('top.app')\n",
        # the deferred edge at module level, and from a module it is not granted to
        "mid/__init__.py": "",
        "mid/cli.py": "import top.app\n",
        "mid/other.py": "def g():\n    import top\n",
        # the sub-package rule, broken through a relative import
        "mid/engine/__init__.py": "",
        "mid/engine/core.py": "from ..http import routes\n",
        "mid/http/__init__.py": "",
        "mid/http/routes.py": "",
        "top/__init__.py": "",
        "top/app.py": "",
        # torch reached through an allowed edge: pure -> low/__init__ -> low.heavy
        "pure/__init__.py": "from low import typed\n",
    })
    (root / "low/__init__.py").write_text("from . import heavy\n")
    problems = check_tree(root, SYNTHETIC)
    text = "\n".join(problems)
    assert "low.plain:2 imports mid: low -> mid points the wrong way" in text
    assert "low.typed:3 imports top.app: low -> top points the wrong way" in text
    assert "low.dynamic:2 imports top.app: low -> top points the wrong way" in text
    assert "mid.cli:1 imports top.app: mid -> top is allowed here only inside a function" in text
    assert "mid.other:2 imports top: mid -> top points the wrong way" in text
    assert "mid.engine.core:1 imports mid.http: mid.engine must never import mid.http" in text
    assert "pure loads torch: pure -> low -> low.heavy:1" in text
    assert len(problems) == 7, text


def test_the_subpackage_rule_waits_for_both_sides(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "", "top/__init__.py": "", "pure/__init__.py": "",
        "mid/__init__.py": "", "mid/engine/__init__.py": "",
        "mid/engine/core.py": "from mid.http import routes\n",  # mid/http not there yet
    })
    assert check_tree(root, SYNTHETIC) == []
    _tree(root, {"mid/http/__init__.py": "", "mid/http/routes.py": ""})
    assert check_tree(root, SYNTHETIC) == [
        "mid.engine.core:1 imports mid.http: mid.engine must never import mid.http"
    ]
