"""The issue-4 detectors inside the running gate: films sent by DCMTK ``storescu`` to ``filmgate serve``.

A lateral chest film and a knee film must be quarantined with ``not-frontal-chest`` (whatever their header says:
both are sent as DX with BodyPartExamined CHEST), a child's film with its age in the header with ``pediatric``, a
child's film without any age by the image model alone, a mirrored adult film with ``flipped``, and the same adult
film as it came must be accepted (the new detectors must not cost good films). ``filmgate inspect`` gives the same
reasons for the same kinds of film as plain images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from filmgate_training.datasets import select
from tests.helpers import MODELS, REPO, Gate, film_pixels, make_dicom, normalise, storescu, val_subset


def _first(kind: str, source: str | None = None, pediatric: str | None = None):
    films = sorted(
        (f for f in select(split="val", kind=kind, source=source) if pediatric is None or f.pediatric == pediatric),
        key=lambda f: str(f.path),
    )
    assert films, (kind, source)
    return films[0]


FILMS = {
    # name: (val film, transform, header age, expected decision, expected reason)
    "lateral": (lambda: _first("lateral-chest", "chexpert"), None, "060Y", "quarantine", "not-frontal-chest"),
    "knee": (lambda: _first("other-radiograph", "knee-oai"), None, "050Y", "quarantine", "not-frontal-chest"),
    "child-with-age": (lambda: _first("frontal-chest", "kermany-fullres"), None, "004Y", "quarantine", "pediatric"),
    "child-no-age": (lambda: _first("frontal-chest", "kermany-fullres"), None, None, "quarantine", "pediatric"),
    "adult": (lambda: _first("frontal-chest", "nih-cxr14", "no"), None, "045Y", "accept", None),
    "adult-mirrored": (lambda: _first("frontal-chest", "nih-cxr14", "no"), "mirror", "045Y", "quarantine", "flipped"),
}


@pytest.fixture(scope="module")
def shipped():
    names = {p.parent.name for p in MODELS.glob("*/manifest.json")}
    assert {"view", "flip", "pediatric", "atypical"} <= names, f"issue-4 detectors not shipped: {sorted(names)}"
    return MODELS


@pytest.fixture(scope="module")
def sent(tmp_path_factory, shipped):
    folder = tmp_path_factory.mktemp("issue4-films")
    made = {}
    for name, (film_fn, transform, age, _, _) in FILMS.items():
        px = film_pixels(film_fn().path)
        if transform == "mirror":
            px = np.ascontiguousarray(px[:, ::-1])
        raw = folder / f"{name}.raw.dcm"
        uid = make_dicom(px, raw, age=age)
        made[name] = (normalise(raw, folder / f"{name}.dcm"), uid)
        raw.unlink()
    gate = Gate.create(tmp_path_factory.mktemp("gate4"), quarantine_layout="{reasons}/{SOPInstanceUID}.dcm")
    gate.start()
    try:
        errors = storescu([p for p, _ in made.values()], gate.dicom_port)
        records = gate.wait_delivered(len(made), timeout=180)
    finally:
        assert gate.stop() == 0, gate.log()[-3000:]
    by_uid = {r["sop_instance_uid"]: r for r in records}
    return {"errors": errors, "records": {name: by_uid[uid] for name, (_, uid) in made.items()}}


def test_storescu_sent_them_all(sent):
    assert sent["errors"] == []


@pytest.mark.parametrize("name", list(FILMS))
def test_gate_decides_each_kind_right(sent, name):
    _, _, _, decision, reason = FILMS[name]
    rec = sent["records"][name]
    assert rec["decision"] == decision, (name, rec["reasons"], rec["scores"])
    assert rec["_folder"] == ("accept" if decision == "accept" else "quarantine")
    if reason:
        assert reason in rec["reasons"], (name, rec["reasons"], rec["scores"])


def test_view_class_is_in_the_sidecar(sent):
    predicted = {
        name: {f["detector"]: f.get("predicted") for f in sent["records"][name]["findings"]}.get("view")
        for name in ("lateral", "knee", "adult")
    }
    assert predicted == {"lateral": "lateral-chest", "knee": "other-radiograph", "adult": "frontal-chest"}


def test_inspect_gives_the_reason_for_each_kind(shipped, tmp_path):
    """``filmgate inspect`` on plain films of each kind (no header: only the image detectors decide)."""
    mirrored = tmp_path / "mirrored.png"
    import cv2

    adult = _first("frontal-chest", "nih-cxr14", "no").path
    cv2.imwrite(str(mirrored), cv2.imread(str(adult), cv2.IMREAD_UNCHANGED)[:, ::-1])
    washed = tmp_path / "washed-out.png"  # a film exposed or windowed so that almost nothing is left of it
    cv2.imwrite(str(washed), (217 + 0.1 * cv2.imread(str(adult), cv2.IMREAD_GRAYSCALE)).astype(np.uint8))
    cases = [
        (adult, "accept", None),
        (mirrored, "quarantine", "flipped"),
        (washed, "quarantine", "atypical"),
        (_first("lateral-chest", "chexpert").path, "quarantine", "not-frontal-chest"),
        (val_subset("other-radiograph", 1, ("cephalogram",))[0].path, "quarantine", "not-frontal-chest"),
        (val_subset("not-radiograph", 1, ("vqa-rad",))[0].path, "quarantine", "not-frontal-chest"),
        (_first("frontal-chest", "kermany").path, "quarantine", "pediatric"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "inspect", *(str(p) for p, _, _ in cases)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(line["file"]) for line in lines] == [Path(p) for p, _, _ in cases]
    for (path, decision, reason), line in zip(cases, lines, strict=True):
        assert set(line["scores"]) >= {"view", "flip", "pediatric", "atypical"}, line
        assert line["decision"] == decision, (path.name, line)
        if reason:
            assert reason in line["reasons"], (path.name, line)
        if reason == "not-frontal-chest":  # the chest-only reasons are dropped there (policy.outranks)
            assert not {"flipped", "pediatric", "atypical"} & set(line["reasons"]), (path.name, line)


def test_gate_report_decides_val_films_and_made_wrong_films_with_the_gate(shipped):
    """The gate report's two measurements on a fixed sample: val films decided right, and wrong films made from
    adult frontal films (collimated, zoomed, washed out, dark, blank, screenshots) kept out by the whole gate."""
    from filmgate_training.detectors.gate_report import decide_all, expected, gate_judge, made_wrong, summarise

    judge = gate_judge(shipped)
    films = [f for kind in ("frontal-chest", "lateral-chest", "other-radiograph", "not-radiograph")
             for f in val_subset(kind, 4)]  # fmt: skip
    summary = summarise(decide_all(films, judge))
    assert summary["films"] == len(films) and summary["right"] >= 0.9 * len(films), summary["by_category"]
    adults = [f for f in val_subset("frontal-chest", 6) if expected(f)[0] == "accept"]
    assert len(adults) >= 10
    for name, m in made_wrong(adults, judge).items():
        assert m["films"] == len(adults) and m["quarantined"] >= 0.9 * len(adults), (name, m)
