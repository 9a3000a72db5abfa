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


def test_the_verdict_is_assembled_by_the_judge_only():
    """Outside the judge (and the policy's own tests), nobody applies the policy or runs the detector set: they call
    filmgate.judge."""
    allowed = {Path(p) for p in ("service/judge.py", "tests/service/test_policy.py",
                                 "tests/detectors/test_policy_pediatric.py")}  # fmt: skip
    for path in _python_files():
        rel = path.relative_to(REPO)
        if rel in allowed:
            continue
        assert "decide" not in _calls(path), f"{rel} calls policy.decide: judge the film with filmgate.judge instead"
