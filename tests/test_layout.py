"""The package's shape (issue 11): layers without cycles, small modules, pure cores, one diagram.

Fast: everything is read with `ast`/`tokenize` from the files under procqueue/, except
the import check, which starts one fresh interpreter per module.

Rules, precisely:

Import graph (`test_no_import_cycle`). A node is a module file under procqueue/. An edge
is an explicit import statement anywhere in a module (top level, inside functions, under
`if TYPE_CHECKING:`): a deferred or type-only import is still a dependency of the design.
`import procqueue.a.b` and `from procqueue.a.b import x` are edges to `procqueue/a/b.py`
(or `.../b/__init__.py` for a package); `from procqueue.a import b`, where `b` is a
submodule, is an edge to `b`, otherwise to `procqueue.a`; relative imports resolve
against the importing module's package. The parent packages Python runs first
(`procqueue/__init__.py` before any `procqueue.x`) are NOT edges: counting them would
put the top-level package, which re-exports the API and so imports most modules, in a
cycle with every module; a submodule never reads names from its half-initialised
parent, so the implicit import cannot bite. An explicit `import procqueue` or
`from procqueue import X` does read the package's namespace and IS an edge to
`procqueue/__init__.py`. Strongly connected components (Tarjan) of two or more modules,
or a module importing itself, are cycles; the test prints one shortest cycle through
each module of each component, every edge with its file:line and kind.

Sizes. A module has at most MAX_MODULE_LINES lines; a class spans at most
MAX_CLASS_LINES lines (`end_lineno - lineno + 1`, decorators not counted).

No mixin. Classes that are exceptions (derive from BaseException), Protocols or enums
are exempt; `typing.Generic[...]` and Protocols (procqueue's or others') in a base list
are not counted as bases. Any other procqueue class fails if (a) it has two or more
bases of which at least one is a procqueue class (behaviour composed from several
classes), or (b) one of its bases is a procqueue class that defines no `__init__` (nor
is a dataclass) and is never referenced anywhere in procqueue except in class base
lists and imports (a class that exists only to lend methods to another). References
are matched by name, across all of procqueue, string annotations included.

Pure packages: the table PURE below. No module of a listed package may import, anywhere
in it, a listed module or any of its submodules ("procqueue": the top-level package
only); relative imports are resolved first. _scheduler gets the whole list; _protocol
may use `os` (framing reads and writes descriptors with os.readv/os.writev).

One diagram. The data-flow diagram is an indented literal block in a module docstring
with `──►` or `◄──` on three or more of its lines that names both "worker" and
"collector" (the task-state diagram has the arrows but names no process; `procqueue
run`'s small diagram has two arrow lines). Exactly one module docstring holds it.
A pointer is a backticked path (`x.py`, `pkg/x.py`, `pkg/`, `procqueue.x.y`) that
follows "drawn in", "diagram" or "wiring" in the same clause (within 80 characters,
no `.` or `;` between), in any docstring or comment under procqueue/ ("state diagram"
is not a pointer). Every pointer must resolve to the diagram's module and to nothing
else: a full path or dotted name resolves to that file, a partial path
(`_local/engine.py`, `engine.py`) to every module whose path ends with it.
"""

from __future__ import annotations

import ast
import builtins
import collections
import concurrent.futures
import enum
import importlib
import io
import itertools
import os
import re
import subprocess
import sys
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "procqueue"

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300

# Pure packages: what no module of each may import, anywhere in it. A name bans its
# submodules too, except "procqueue": only the top-level package itself (it imports the
# whole engine), not its submodules.
_ENGINE = ("procqueue", "procqueue._local", "procqueue._monitor", "procqueue._cli", "procqueue._pool")
# fmt: off
PURE: dict[str, tuple[str, ...]] = {
    # package               may not import
    "procqueue._scheduler": ("os", "socket", "select", "selectors", "subprocess", "multiprocessing",
                             "threading", "signal", "psutil", *_ENGINE),
    "procqueue._protocol":  (      "socket", "select", "selectors", "subprocess", "multiprocessing",
                             "threading", "signal", "psutil", *_ENGINE),  # os: framing reads/writes fds
}
# fmt: on

ARROWS = ("──►", "◄──")
POINTER = re.compile(r"(?<!state )(?:\bdrawn in\b|\bdiagram\b|\bwiring\b)[^`.;]{0,80}?`([^`\s]+)`", re.IGNORECASE)


# --- reading the package ----------------------------------------------------------------


@dataclass
class Module:
    name: str  # procqueue._local.engine
    path: Path
    tree: ast.Module
    source: str

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        source = path.read_text(encoding="utf-8")
        found[".".join(parts)] = Module(".".join(parts), path, ast.parse(source, str(path)), source)
    return found


def absolute(mod: Module, level: int, target: str | None) -> str:
    """The absolute name of `from {'.' * level}{target} import ...` in `mod`."""
    if level == 0:
        return target or ""
    package = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name, resolved to a module of procqueue where it is one
    line: int
    kind: str  # "module level", "in a function", "TYPE_CHECKING"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportFinder(ast.NodeVisitor):
    def __init__(self, mod: Module) -> None:
        self.mod = mod
        self.found: list[Import] = []
        self.kind = ["module level"]

    def _scoped(self, node: ast.AST, kind: str) -> None:
        self.kind.append(kind if self.kind[-1] == "module level" else self.kind[-1])
        self.generic_visit(node)
        self.kind.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, "in a function")

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scoped(node, "in a function")

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.kind.append("TYPE_CHECKING")
        for child in node.body:
            self.visit(child)
        self.kind.pop()
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(alias.name, node.lineno, self.kind[-1]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = absolute(self.mod, node.level, node.module)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            target = sub if alias.name != "*" and sub in modules() else base
            self.found.append(Import(target, node.lineno, self.kind[-1]))


@cache
def imports_of(name: str) -> tuple[Import, ...]:
    finder = _ImportFinder(modules()[name])
    finder.visit(modules()[name].tree)
    return tuple(finder.found)


def internal(target: str) -> bool:
    return target == "procqueue" or target.startswith("procqueue.")


# --- import graph -------------------------------------------------------------------------


def import_graph() -> dict[str, dict[str, list[Import]]]:
    graph: dict[str, dict[str, list[Import]]] = {name: {} for name in modules()}
    for name in modules():
        for imp in imports_of(name):
            if internal(imp.target) and imp.target in modules():
                graph[name].setdefault(imp.target, []).append(imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm; the components that hold a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, dict[str, list[Import]]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = collections.deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in within and w not in seen:
                seen.add(w)
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a component but on no cycle")


def describe_cycle(graph: dict[str, dict[str, list[Import]]], cycle: list[str]) -> str:
    steps = [cycle[0]]
    for a, b in itertools.pairwise(cycle):
        where = ", ".join(sorted({f"{modules()[a].rel}:{i.line} {i.kind}" for i in graph[a][b]}))
        steps.append(f"  -> {b}   [{where}]")
    return "\n".join(steps)


def test_every_procqueue_import_resolves_to_a_module() -> None:
    dangling = [
        f"{modules()[name].rel}:{imp.line}: {imp.target} ({imp.kind})"
        for name in modules()
        for imp in imports_of(name)
        if internal(imp.target) and imp.target not in modules()
    ]
    assert not dangling, "imports of procqueue modules that do not exist:\n" + "\n".join(dangling)


def test_no_import_cycle() -> None:
    graph = import_graph()
    report = []
    for component in strongly_connected(graph):
        within = set(component)
        cycles: dict[tuple[str, ...], list[str]] = {}
        for start in component:
            cycle = shortest_cycle(graph, start, within)
            ring = cycle[:-1]
            turn = ring.index(min(ring))
            canonical = ring[turn:] + ring[:turn]
            cycles.setdefault(tuple(canonical), [*canonical, canonical[0]])
        report.append(
            f"component of {len(component)} modules: {', '.join(component)}\n"
            + "\n".join(describe_cycle(graph, c) for c in sorted(cycles.values(), key=len))
        )
    assert not report, "import cycles:\n\n" + "\n\n".join(report)


# --- fresh interpreters -----------------------------------------------------------------


def _import_alone(name: str) -> str | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if name.endswith(".__main__"):  # importing it runs the program: run it harmlessly instead
        cmd = [sys.executable, "-m", name.removesuffix(".__main__"), "--help"]
    else:
        cmd = [sys.executable, "-c", f"import {name}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return f"{name}: import did not finish in 60 s"
    if done.returncode != 0:
        return f"{name}: exit code {done.returncode}\n{done.stderr.strip()[-2000:]}"
    return None


def test_each_module_imports_in_a_fresh_interpreter() -> None:
    names = sorted(modules())
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as threads:
        failures = [(name, f) for name, f in zip(names, threads.map(_import_alone, names)) if f]
    by_error: dict[str, list[str]] = collections.defaultdict(list)
    details: dict[str, str] = {}
    for name, failure in failures:  # one broken module breaks all that import it: say so once
        last = failure.strip().splitlines()[-1]
        by_error[last].append(name)
        details.setdefault(last, failure)
    assert not failures, "modules that do not import on their own:\n\n" + "\n\n".join(
        f"{len(mods)} module(s): {', '.join(mods)}\nfirst: {details[last]}" for last, mods in by_error.items()
    )


# --- sizes -------------------------------------------------------------------------------


def test_no_module_over_the_limit() -> None:
    big = {mod.rel: n for mod in modules().values() if (n := len(mod.source.splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def _classes(mod: Module) -> list[ast.ClassDef]:
    return [node for node in ast.walk(mod.tree) if isinstance(node, ast.ClassDef)]


def test_no_class_over_the_limit() -> None:
    big = {
        f"{mod.rel}:{node.lineno} {node.name}": n
        for mod in modules().values()
        for node in _classes(mod)
        if (n := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_CLASS_LINES
    }
    assert not big, f"classes over {MAX_CLASS_LINES} lines: {big}"


# --- no mixin ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRef:
    module: str
    name: str


@dataclass
class Resolved:
    """A base class: one of procqueue's (`ours`) or an object from elsewhere (`theirs`)."""

    ours: ClassRef | None = None
    theirs: Any = None
    text: str = ""
    generic: bool = False  # typing.Generic[...]: not counted as a base


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


@cache
def bindings(name: str) -> dict[str, tuple[str, str | None]]:
    """What the module's imports bind: local name -> (module, attribute or None for the module)."""
    mod = modules()[name]
    bound: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = (alias.name, None)
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = (top, None)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(mod, node.level, node.module)
            for alias in node.names:
                if alias.name != "*":
                    bound[alias.asname or alias.name] = (base, alias.name)
    return bound


def _top_level_classes(name: str) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in modules()[name].tree.body if isinstance(node, ast.ClassDef)}


def _external(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _ours(module: str, attr: str, seen: frozenset[tuple[str, str]] = frozenset()) -> ClassRef | None:
    """Follow re-exports to where a procqueue class is defined."""
    if (module, attr) in seen or module not in modules():
        return None
    if attr in _top_level_classes(module):
        return ClassRef(module, attr)
    if f"{module}.{attr}" in modules():
        return None  # a module, not a class
    source = bindings(module).get(attr)
    if source and internal(source[0]) and source[1]:
        return _ours(source[0], source[1], seen | {(module, attr)})
    return None


def resolve_base(module: str, node: ast.expr) -> Resolved:
    text = ast.unparse(node)
    if isinstance(node, ast.Subscript):  # Generic[T], Protocol[T], SomeBase[T]
        node = node.value
    dotted = _dotted(node)
    if dotted is None:
        return Resolved(text=text)
    head, _, rest = dotted.partition(".")
    if not rest and head in _top_level_classes(module):
        return Resolved(ours=ClassRef(module, head), text=text)
    bound = bindings(module).get(head)
    if bound is None:
        return Resolved(theirs=None if rest else getattr(builtins, head, None), text=text)
    full = ".".join(filter(None, [bound[0], bound[1], rest]))
    if internal(full):
        owner, _, cls = full.rpartition(".")
        return Resolved(ours=_ours(owner, cls), text=text)
    obj = _external(full)
    return Resolved(theirs=obj, text=text, generic=obj is typing.Generic)


def _class_node(ref: ClassRef) -> ast.ClassDef:
    return _top_level_classes(ref.module)[ref.name]


def all_classes() -> list[tuple[str, ast.ClassDef]]:
    return [(name, node) for name, mod in modules().items() for node in _classes(mod)]


@cache
def exempt(module: str, class_name: str) -> str | None:
    """Why a procqueue class is exempt from the mixin rule: exception, protocol, enum."""
    node = next(n for n in _classes(modules()[module]) if n.name == class_name)
    for base in node.bases:
        r = resolve_base(module, base)
        if r.ours is not None:
            why = exempt(r.ours.module, r.ours.name)
            if why in ("exception", "enum"):
                return why
        elif isinstance(r.theirs, type):
            if issubclass(r.theirs, BaseException):
                return "exception"
            if issubclass(r.theirs, enum.Enum):
                return "enum"
        if r.theirs is typing.Protocol:
            return "protocol"
    return None


def _defines_init(node: ast.ClassDef) -> bool:
    if any(isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) and s.name == "__init__" for s in node.body):
        return True
    return any("dataclass" in ast.unparse(d) for d in node.decorator_list)


@cache
def references() -> collections.Counter[str]:
    """Names used anywhere in procqueue except in class base lists (imports bind, not use)."""
    used: collections.Counter[str] = collections.Counter()
    for mod in modules().values():
        in_bases = {id(n) for c in _classes(mod) for b in c.bases for n in ast.walk(b)}
        for node in ast.walk(mod.tree):
            if id(node) in in_bases:
                continue
            if isinstance(node, ast.Name):
                used[node.id] += 1
            elif isinstance(node, ast.Attribute):
                used[node.attr] += 1
            annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                try:
                    parsed = ast.parse(annotation.value, mode="eval")
                except SyntaxError:
                    continue
                used.update(n.id for n in ast.walk(parsed) if isinstance(n, ast.Name))
    return used


def _interface(base: Resolved) -> bool:
    """A Protocol named as a base declares what a class implements; it lends no behaviour."""
    if base.ours is not None:
        return exempt(base.ours.module, base.ours.name) == "protocol"
    return base.theirs is typing.Protocol or bool(getattr(base.theirs, "_is_protocol", False))


def test_no_mixin() -> None:
    problems = []
    for module, node in all_classes():
        if exempt(module, node.name):
            continue
        where = f"{modules()[module].rel}:{node.lineno} class {node.name}"
        bases = [r for r in (resolve_base(module, b) for b in node.bases) if not (r.generic or _interface(r))]
        ours = [r for r in bases if r.ours is not None]
        if len(bases) >= 2 and ours:
            problems.append(f"{where}({', '.join(r.text for r in bases)}): composed of several classes")
        for r in ours:
            assert r.ours is not None
            base = _class_node(r.ours)
            if exempt(r.ours.module, r.ours.name) or _defines_init(base):
                continue
            if references()[r.ours.name] == 0:
                problems.append(
                    f"{where}({r.text}): {r.ours.module}.{r.ours.name} has no __init__ and is used only"
                    " as a base (a mixin)"
                )
    assert not problems, "mixins:\n" + "\n".join(problems)


# --- pure packages -------------------------------------------------------------------------


def _forbidden(target: str, banned: tuple[str, ...]) -> str | None:
    for b in banned:
        if target == b or (b != "procqueue" and target.startswith(b + ".")):
            return b
    return None


@pytest.mark.parametrize("package", sorted(PURE))
def test_pure_packages_stay_pure(package: str) -> None:
    assert package in modules(), f"{package} is gone: update PURE"
    found = [
        f"{modules()[name].rel}:{imp.line}: imports {imp.target} ({imp.kind})"
        for name in modules()
        if name == package or name.startswith(package + ".")
        for imp in imports_of(name)
        if _forbidden(imp.target, PURE[package])
    ]
    assert not found, f"{package} must not import {', '.join(PURE[package])}:\n" + "\n".join(found)


# --- the diagram --------------------------------------------------------------------------


def _literal_blocks(text: str) -> list[str]:
    """Runs of indented lines (blank lines inside a run kept), as in a reST literal block."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        blank = not line.strip()
        if (blank and current) or (not blank and line.startswith(("    ", "\t"))):
            current.append(line)
        else:
            if current:
                blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return ["\n".join(b) for b in blocks]


def draws_the_data_flow(docstring: str) -> bool:
    for block in _literal_blocks(docstring):
        arrow_lines = sum(1 for line in block.splitlines() if any(a in line for a in ARROWS))
        lowered = block.lower()
        if arrow_lines >= 3 and "worker" in lowered and "collector" in lowered:
            return True
    return False


def diagram_modules() -> list[Module]:
    return [mod for mod in modules().values() if draws_the_data_flow(ast.get_docstring(mod.tree, clean=False) or "")]


def test_exactly_one_module_draws_the_data_flow() -> None:
    found = [mod.rel for mod in diagram_modules()]
    assert len(found) == 1, f"module docstrings that draw the data flow (want exactly one): {found}"


def _texts(mod: Module) -> list[tuple[int, str]]:
    """(first line, text) of every docstring and comment block of a module."""
    texts = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                texts.append((first.lineno, first.value.value))
    comments: list[tuple[int, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(mod.source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line, text = tok.start[0], tok.string.lstrip("#").strip()
        if comments and comments[-1][0] + comments[-1][1].count("\n") == line - 1:
            comments[-1] = (comments[-1][0], comments[-1][1] + "\n" + text)
        else:
            comments.append((line, text))
    return texts + comments


def resolve_pointer(pointer: str) -> set[str]:
    """The module files (relative to the repo) a backticked path may mean."""
    files = {mod.rel for mod in modules().values()}
    p = pointer.strip().rstrip("/")
    if not p.endswith(".py") and "/" not in p and p.startswith("procqueue"):
        mod = modules().get(p)
        return {mod.rel} if mod else set()
    if not p.endswith(".py"):
        p += "/__init__.py"
    if p.startswith("procqueue/"):
        return {p} & files
    return {f for f in files if f == p or f.endswith("/" + p)}


def pointers() -> list[tuple[str, int, str]]:
    found = []
    for mod in modules().values():
        for first_line, text in _texts(mod):
            for match in POINTER.finditer(text):
                target = match.group(1)
                if target.endswith(".py") or "/" in target or target.startswith("procqueue."):
                    found.append((mod.rel, first_line + text.count("\n", 0, match.start(1)), target))
    return found


def test_every_pointer_to_the_diagram_names_its_module() -> None:
    drawn = diagram_modules()
    if len(drawn) != 1:
        pytest.fail(f"no single diagram to point at (see the test above): {[m.rel for m in drawn]}")
    home = drawn[0].rel
    wrong = [
        f"{rel}:{line}: `{target}` -> {sorted(resolved) or 'nothing'}"
        for rel, line, target in pointers()
        if (resolved := resolve_pointer(target)) != {home}
    ]
    assert not wrong, f"pointers to the diagram that do not name {home}:\n" + "\n".join(wrong)


def test_the_pointer_finder_finds_pointers() -> None:
    """The rules above check something: the package does say where its wiring is drawn."""
    assert pointers(), "no docstring or comment says where the wiring is drawn"
    assert resolve_pointer("procqueue/_local/__init__.py") == {"procqueue/_local/__init__.py"}
    assert resolve_pointer("procqueue._scheduler") == {"procqueue/_scheduler/__init__.py"}
    assert resolve_pointer("_no_such_module.py") == set()
    assert not draws_the_data_flow("x\n\n    A ─► B\n    C ─► D\n    E ──► F\n    G ──► H\n")
