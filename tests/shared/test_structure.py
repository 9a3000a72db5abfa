"""The code's shape, checked: one judge, one place that makes onnxruntime sessions."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

SOURCES = ("service", "training", "tests", "bench")


def _python_files() -> list[Path]:
    files = [p for top in SOURCES for p in (REPO / top).rglob("*.py")]
    files += [p for p in (REPO / "bench").iterdir() if p.is_file() and not p.suffix and _is_python(p)]
    return sorted(files)


def _is_python(path: Path) -> bool:
    return path.read_bytes()[:64].startswith(b"#!") and b"python" in path.read_bytes()[:64]


def _calls(path: Path) -> set[str]:
    """Names of the functions and attributes called in ``path`` (``a.b.c()`` gives ``c``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
    return out


def test_one_place_makes_onnxruntime_sessions():
    makers = [p.relative_to(REPO) for p in _python_files() if "InferenceSession" in _calls(p)]
    assert makers == [Path("service/detectors.py")], f"use filmgate.detectors.onnx_session instead: {makers}"


def _uses_policy_decide(path: Path) -> bool:
    """``from filmgate.policy import decide`` or ``policy.decide(...)`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        imported = isinstance(node, ast.ImportFrom) and node.module == "filmgate.policy"
        if imported and any(a.name == "decide" for a in node.names):  # type: ignore[union-attr]
            return True
        if isinstance(node, ast.Attribute) and node.attr == "decide" and ast.unparse(node.value).endswith("policy"):
            return True
    return False


def test_the_verdict_is_assembled_by_the_judge_only():
    """Outside the judge (and the policy's own tests), nobody applies the policy: they call filmgate.judge."""
    allowed = {Path(p) for p in ("service/judge.py", "tests/service/test_policy.py",
                                 "tests/detectors/test_policy_pediatric.py")}  # fmt: skip
    users = {p.relative_to(REPO) for p in _python_files() if _uses_policy_decide(p)}
    assert users - allowed == set(), "judge the film with filmgate.judge instead"
    assert Path("service/judge.py") in users  # the check sees the real use


PACKAGES = {"filmgate": REPO / "service", "filmgate_training": REPO / "training"}


def _modules() -> dict[str, Path]:
    """Every module of the two import packages, by dotted name."""
    out = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines |= {n.lineno for n in ast.walk(inner) if isinstance(n, ast.Import | ast.ImportFrom)}
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in it (module level or inside a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, ``level - 1`` packages up
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_filmgate_or_filmgate_training():
    """Counting imports inside functions too: a cycle hidden in a function is still two modules that cannot be
    understood (or changed) one without the other."""
    graph = import_graph()
    assert len(graph) > 40 and "filmgate.judge" in graph["filmgate.pipeline"]  # the graph is really read
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tests_take_helpers_from_tests_helpers_only():
    """Shared test helpers live in one module (tests/helpers.py): none is imported from a conftest file or defined
    twice."""
    tests = sorted((REPO / "tests").rglob("*.py"))
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.endswith("conftest"), f"{path.relative_to(REPO)} imports from {node.module}"
    helpers = {n.name for n in ast.parse((REPO / "tests" / "helpers.py").read_text()).body
               if isinstance(n, ast.FunctionDef | ast.ClassDef)}  # fmt: skip
    for path in tests:
        if path.name == "helpers.py":
            continue
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        assert not defined & {"free_port", "wait_for", "wait_until"}, f"{path.relative_to(REPO)}: use tests/helpers"
        assert not (defined & helpers) - {"test_" + n for n in helpers}, (path.relative_to(REPO), defined & helpers)
