"""The README's table of shipped detectors is what `models/` ships: one row per ``models/<name>/manifest.json``, at
its version, and every val count it quotes is the shipped one. The table once gave ``atypical`` 1.1.0 with 6/1,406
frontal films flagged while the shipped model was 1.3.0 with 5/1,918; whoever ships a model is told here which row
to write or update.

Counts, per row: "clean val films flagged then" is the model's own evaluation (``evaluation.json`` beside the
manifest, and the manifest's rate of it); "on today's val split" is the float model on the val split as it is now,
from the int8 comparison (``int8.json``, of the same version).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
MODELS = REPO / "models"
ROW = re.compile(r"^\| `(?P<name>[\w-]+)` (?P<version>\S+) \|(?P<cells>.*)\|$", re.M)
COUNT = re.compile(r"(\d[\d,]*) / (\d[\d,]*)")
FIX = "update the README's table under '## The shipped detectors'"


def _table() -> dict[str, tuple[str, list[str]]]:
    """``{name: (version, [cells after the first])}`` of the README's detector table."""
    section = README.read_text().split("## The shipped detectors", 1)[1].split("\n## ", 1)[0]
    return {m["name"]: (m["version"], [c.strip() for c in m["cells"].split("|")]) for m in ROW.finditer(section)}


def _manifests() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(MODELS.glob("*/manifest.json")):
        manifest = json.loads(path.read_text())
        out[manifest["name"]] = {**manifest, "folder": path.parent}
    return out


def _count(cell: str) -> tuple[int, int] | None:
    """The first ``k / n`` of a cell (None when it quotes none, e.g. ``-``)."""
    m = COUNT.search(cell)
    return (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) if m else None


def _evaluated_clean_flagged(manifest: dict[str, Any]) -> tuple[int, int]:
    """Clean val films flagged / clean val films of the model's own evaluation, checked against the manifest's rate:
    a classifier's unaltered films (``val.pooled``), a score's frontal chest films (``val.by_kind``)."""
    folder: Path = manifest["folder"]
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["version"] == manifest["version"], f"{folder}/evaluation.json is of another version"
    val, metrics = evaluation["val"], manifest["metrics"]
    if "pooled" in val:
        flagged, of = val["pooled"]["flagged_unaltered"], val["pooled"]["unaltered"]
        rate = metrics["fpr_unaltered"]
    elif "by_kind" in val:
        flagged, of = val["by_kind"]["frontal-chest"]["flagged"], val["by_kind"]["frontal-chest"]["films"]
        rate = metrics["val_frontal_flagged"]
    else:  # a new kind of evaluation: teach this test where its clean-film count is
        raise AssertionError(f"{folder}/evaluation.json: no val.pooled or val.by_kind; extend {__file__}")
    assert flagged / of == pytest.approx(rate), f"{folder}: evaluation.json and manifest.json disagree"
    return flagged, of


def test_the_table_names_every_shipped_detector_at_its_shipped_version():
    table, shipped = _table(), _manifests()
    assert len(shipped) >= 6 and table, "the check sees the models and the table"
    assert {n: v for n, (v, _) in table.items()} == {n: m["version"] for n, m in shipped.items()}, (
        f"{FIX}: one row per models/<name>/manifest.json, `name` version as the manifest gives them"
    )


@pytest.mark.parametrize("name", sorted(_manifests()))
def test_the_val_counts_the_table_quotes_are_the_shipped_ones(name):
    table, manifest = _table(), _manifests()[name]
    if name not in table:
        pytest.fail(f"{FIX}: add a row for {name} {manifest['version']}")
    _, cells = table[name]
    then, today = _count(cells[1]), _count(cells[2]) if len(cells) > 2 else None
    assert then is not None, f"{FIX}: the row of {name} quotes no 'k / n' of clean val films flagged"
    assert then == _evaluated_clean_flagged(manifest), f"{FIX}: {name}'s clean val films flagged, as evaluated"
    if (manifest["folder"] / "int8.json").exists():  # the float model on today's val split, from the int8 comparison
        assert today is not None, f"{FIX}: the row of {name} quotes no 'k / n' on today's val split (int8.md)"
        int8 = json.loads((manifest["folder"] / "int8.json").read_text())
        assert int8["version"] == manifest["version"], f"models/{name}/int8.json is of an older version; rerun it"
        fp32 = int8["val"]["pooled"]["clean"]["fp32"]
        assert today == (fp32["flagged"], fp32["of"]), f"{FIX}: {name}'s clean films flagged on today's val split"
