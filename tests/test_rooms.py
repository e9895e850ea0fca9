"""The shape of the package: rooms in order, no circles, small files, imports at the top.

Every module under ``fxpp/`` is parsed with ``ast`` (nothing is imported), each import
is mapped to the module it names and to that module's *room*, and:

(a) no room imports a higher room (``ROOMS`` lists them lowest first);
(b) no import circle between modules (imports inside functions count; those under
    ``if TYPE_CHECKING:`` do not, they name a type and run nothing);
(c) no package module does ``import fxpp`` (or ``from fxpp import ...``): it reaches
    its own package by relative imports;
(d) no file is over ``MAX_LINES`` lines;
(e) an import inside a function says why, in a comment on its line or the line above
    (an optional dependency, start-up time), or is in ``ALLOWED_LOCAL_IMPORTS``.

See ``docs/how-it-works.md`` for what each room holds.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fxpp"
MAX_LINES = 600

# Rooms, lowest first: a module may import its own room and any room listed before it.
# A room is a module (``fxpp.errors``) or a package (``fxpp.trace``, with everything in it).
ROOMS = [
    "fxpp.errors",  # the error tree
    "fxpp.meta",  # every node/graph key fxpp writes, as typed records
    "fxpp.ops",  # the functions graph nodes call
    "fxpp.spec",  # stage roles and the validated stage description
    "fxpp.split",  # choosing cuts: arithmetic over per-layer costs
    "fxpp.presets",  # tiny model configs shared by the trainer and the tests
    "fxpp.model_facts",  # the user's model: its forward, its device, leaving it unchanged
    "fxpp.inputs",  # media and modalities, the signature, example inputs, unused inputs
    "fxpp.trace",  # the HF-aware tracer
    "fxpp.analysis",  # what each node is, what crosses a cut, costs
    "fxpp.passes",  # one file per rewrite
    "fxpp.layout",  # the wire format of a cut
    "fxpp.stage_module",  # the stage and its variants
    "fxpp.compile",  # the compile driver and the transform door
    "fxpp.runtime",  # the library over torch.distributed.pipelining
    "fxpp.pipeline",  # the pipeline door
    "fxpp",  # the package's public names (fxpp/__init__.py)
    "fxpp.trainer",  # the `fxpp run` application
    "fxpp.testing",  # tiny models, sweeps, reference comparisons
    "fxpp.__main__",  # `python -m fxpp`: the trainer's command line
    "fxpp.sweep",  # `python -m fxpp.sweep`: the sweeps' command line
]

# Imports inside functions that need no comment, with the reason.
ALLOWED_LOCAL_IMPORTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the fxpp module imported, or the outside module's top name
    line: int
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``
    absolute_fxpp: bool  # ``import fxpp`` / ``from fxpp ... import``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The fxpp modules a ``from ... import`` names (a submodule where a name is one)."""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        if node.module:
            base = f"{base}.{node.module}"
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in MODULES else base)
    return targets


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                name = alias.name if alias.name in MODULES else top
                found.append(Import(module, name, node.lineno, local, type_only, top == "fxpp"))
            return
        if isinstance(node, ast.ImportFrom):
            absolute = not node.level and (node.module or "").split(".")[0] == "fxpp"
            if node.level or absolute:
                for target in _resolve(module, path, node):
                    found.append(Import(module, target, node.lineno, local, type_only, absolute))
            else:
                found.append(Import(module, (node.module or "").split(".")[0], node.lineno, local, type_only, False))
            return
        inner_local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, inner_local, True)
            for child in node.orelse:
                visit(child, inner_local, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_local, type_only)

    visit(tree, False, False)
    return found


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def room_of(module: str) -> int:
    """The index in ``ROOMS`` of the room holding ``module``: the longest matching prefix."""
    best = None
    for i, room in enumerate(ROOMS):
        if module == room or module.startswith(room + "."):
            if best is None or len(room) > len(ROOMS[best]):
                best = i
    assert best is not None, f"{module} is in no room; add it to ROOMS"
    return best


def _fxpp_imports():
    for module, imports in IMPORTS.items():
        for imp in imports:
            if imp.target == "fxpp" or imp.target.startswith("fxpp."):
                yield imp


def test_every_module_has_a_room():
    for module in MODULES:
        room_of(module)


def test_no_room_imports_a_higher_room():
    upward = []
    for imp in _fxpp_imports():
        here, there = room_of(imp.module), room_of(imp.target)
        if there > here:
            upward.append(f"{imp.module}:{imp.line} imports {imp.target} ({ROOMS[here]} < {ROOMS[there]})")
    assert not upward, "imports running back up:\n" + "\n".join(upward)


def test_no_import_circles():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in _fxpp_imports():
        if not imp.type_only and imp.target != imp.module:
            edges[imp.module].add(imp.target)
    # Tarjan's strongly connected components; a component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_no_package_module_imports_fxpp():
    absolute = [f"{imp.module}:{imp.line} imports {imp.target}" for imp in _fxpp_imports() if imp.absolute_fxpp]
    assert not absolute, "package modules reach their own package by relative imports:\n" + "\n".join(absolute)


def test_no_file_over_the_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_local_imports_say_why():
    silent = []
    for module, imports in IMPORTS.items():
        lines = MODULES[module].read_text().splitlines()
        for imp in imports:
            if not imp.local or (module, imp.target) in ALLOWED_LOCAL_IMPORTS:
                continue
            here, above = lines[imp.line - 1], lines[imp.line - 2] if imp.line > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{module}:{imp.line}: {here.strip()}")
    assert not silent, ("imports inside functions without a comment saying why (move them to the top, "
                        "or say why they cannot be there):\n" + "\n".join(silent))


def test_the_checks_see_imports():
    """The parser finds what it should (a guard against a test that passes on nothing)."""
    targets = {imp.target for imp in IMPORTS["fxpp.compile"]}
    assert "fxpp.errors" in targets and "fxpp.trace" in targets and "torch" in targets
    assert room_of("fxpp.trace.tracer") == ROOMS.index("fxpp.trace")
    assert room_of("fxpp") == ROOMS.index("fxpp")
    assert room_of("fxpp.model_facts") < room_of("fxpp.inputs.signature") < room_of("fxpp.trace.driver")
