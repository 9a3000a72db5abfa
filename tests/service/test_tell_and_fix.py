"""Tell the PACS and fix what can be fixed: corrected derived films, study summaries, IOCM rejection notes.

Everything goes through the real node (`filmgate serve`), real DCMTK storescu, the shipped detectors and, for the
rejection notes, a real Orthanc (the hospital PACS of deploy/orthanc/hospital.json). Every object the node makes is
checked by dciodvfy (Debian dicom3tools).

The films are real adult frontal films of the val split, stored as complete CR instances; the faulty ones are made
from them (turned, mirrored, grey-inverted) as the detectors were trained to see them. A film is only used when the
shipped detectors flag its faulty copy with that reason (and at most `not-frontal-chest` besides, which a turned or
inverted chest film often raises; a precondition checked through the judge), because what is tested here is what
the node does with such a verdict.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from filmgate.config import parse_config
from filmgate.index import DecisionIndex
from filmgate.judge import Judge
from filmgate.review.auth import hash_password
from filmgate_training.datasets import select
from tests.helpers import (
    CR_STORAGE,
    MODELS,
    Gate,
    Orthanc,
    compress,
    film_pixels,
    free_port,
    make_dicom,
    storescu,
    wait_until,
)

ANN_PASSWORD = "correct horse battery staple"
ANN_HASH = hash_password(ANN_PASSWORD)
FAULTS = {
    "rotated": lambda px: np.rot90(px, 1),  # stored turned 90 degrees counter-clockwise
    "flipped": lambda px: px[:, ::-1],
    "inverted": lambda px: 4095 - px,
}


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy is not installed (Debian dicom3tools; scripts/bootstrap installs it)"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def make_cr(pixels: np.ndarray, path: Path, *, study_uid: str, series_uid: str, number: int) -> str:
    """A complete CR Image instance (every Type 1 and 2 attribute of the IOD), 12-bit MONOCHROME2."""
    return make_dicom(
        pixels, path, modality="CR", sop_class=CR_STORAGE, age="054Y", study_uid=study_uid, series_uid=series_uid,
        extra={
            "SpecificCharacterSet": "ISO_IR 100", "PatientBirthDate": "19700101", "PatientSex": "F",
            "StudyTime": "101010", "ReferringPhysicianName": "", "StudyID": "1", "AccessionNumber": "ACC0001",
            "SeriesNumber": number, "InstanceNumber": number, "BodyPartExamined": "CHEST", "ViewPosition": "PA",
            "Manufacturer": "filmgate tests", "PatientOrientation": ["L", "F"], "ImagerPixelSpacing": [0.2, 0.2],
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load(parse_config({"detectors": {"models_dir": str(MODELS)}}))


@pytest.fixture(scope="module")
def val_chest() -> dict[str, list[Path]]:
    """Fixed val films (no randomness): adult frontal films of three hospitals, interleaved, and lateral films."""
    frontal = [f for f in select(split="val", kind="frontal-chest") if f.pediatric != "yes"]
    by_source = [[f.path for f in frontal if f.source == s][:15] for s in ("hannover", "chexpert", "nih-cxr14")]
    lateral = [f.path for f in select(split="val", kind="lateral-chest")][:1]
    assert all(by_source) and lateral
    return {"frontal": [p for group in zip(*by_source, strict=False) for p in group], "lateral": lateral}


@pytest.fixture(scope="module")
def films(val_chest, judge, tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """One good frontal film and, for each fault, a film whose faulty copy the detectors flag for that reason alone."""
    root = tmp_path_factory.mktemp("tell-and-fix")
    found: dict[str, tuple[Path, np.ndarray]] = {}
    study, series = generate_uid(), generate_uid()
    for i, film in enumerate(val_chest["frontal"]):
        px = film_pixels(film)
        good = root / f"good-{i}.dcm"
        make_cr(px, good, study_uid=study, series_uid=series, number=1)
        if "good" not in found and judge.judge(good).decision.accepted:
            found["good"] = (good, px)
            continue
        for fault, make in FAULTS.items():
            if fault in found:
                continue
            path = root / f"{fault}-{i}.dcm"
            make_cr(make(px), path, study_uid=study, series_uid=series, number=1)
            reasons = judge.judge(path).decision.reasons
            if reasons[:1] == (fault,) and set(reasons) <= {fault, "not-frontal-chest"}:
                found[fault] = (path, px)
                break
        if len(found) == 4:
            return found
    pytest.fail(f"the shipped detectors flag none of the val films for {set(FAULTS) - set(found)} alone")


def _restudy(src: Path, dst: Path, study_uid: str) -> str:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_corrected_films_and_a_study_summary(tmp_path, films, val_chest, judge):
    """Rotated, mirrored and inverted films of one study, with a good frontal and a lateral film: each faulty film
    stays in quarantine and its corrected derived film, upright and normal by the detectors' own judgement, arrives
    at the accept folder with references to its original and passes dciodvfy; once the study is stable, one summary
    with the right counts is written beside the accepted films and counted."""
    study = generate_uid()
    sent = {}
    for name in ("good", *FAULTS):
        sent[name] = _restudy(films[name][0], tmp_path / f"{name}.dcm", study)
    # The rotated film arrives JPEG-lossless compressed: its derived film is stored uncompressed, pixels exact.
    compress(tmp_path / "rotated.dcm", tmp_path / "rotated-jpeg.dcm", "jpeg-lossless")
    (tmp_path / "rotated-jpeg.dcm").replace(tmp_path / "rotated.dcm")
    lateral_px = film_pixels(val_chest["lateral"][0])
    make_cr(lateral_px, tmp_path / "lateral.dcm", study_uid=study, series_uid=generate_uid(), number=2)
    sent["lateral"] = str(pydicom.dcmread(tmp_path / "lateral.dcm").SOPInstanceUID)

    gate = Gate.create(
        tmp_path / "gate",
        accept_layout="{StudyInstanceUID}/{SOPInstanceUID}.dcm",
        correct={"enabled": True},
        studies={"stable_seconds": 1.0, "summary_file": True},
    ).start()
    storescu([tmp_path / f"{n}.dcm" for n in sent], gate.dicom_port)
    delivered = gate.wait_delivered(len(sent) + len(FAULTS))

    by_uid = {r["sop_instance_uid"]: r for r in delivered}
    assert by_uid[sent["good"]]["_folder"] == "accept"
    assert by_uid[sent["lateral"]]["reasons"] == ["not-frontal-chest"]
    for fault in FAULTS:
        original = by_uid[sent[fault]]
        assert original["_folder"] == "quarantine" and original["reasons"][0] == fault
        link = original["corrected"]
        assert link["outcome"] == "accept", original
        derived = by_uid[link["sop_instance_uid"]]
        assert derived["_folder"] == "accept" and derived["derived_from"]["sop_instance_uid"] == sent[fault]
        path = Path(derived["_path"])
        assert dciodvfy_errors(path) == [], f"{fault}: dciodvfy errors"
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == sent[fault]
        assert ds.StudyInstanceUID == study
        assert ds.SeriesInstanceUID != pydicom.dcmread(tmp_path / f"{fault}.dcm").SeriesInstanceUID
        assert ds.DerivationDescription and ds.DerivationCodeSequence
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        again = judge.judge(path)  # the detectors' own judgement of the derived film
        assert again.decision.accepted, (fault, again.decision)
        predicted = {f.detector: f.predicted for f in again.findings}
        assert predicted["orientation"] == "upright" and predicted["inversion"] == "normal"
        assert predicted["flip"] == "normal"
        upright = films[fault][1]
        if fault == "inverted":
            assert ds.PhotometricInterpretation == "MONOCHROME1"
            assert np.array_equal(ds.pixel_array, 4095 - upright)
        else:
            assert np.array_equal(ds.pixel_array, upright), f"{fault}: pixels not put back exactly"

    summary_path = gate.root / "accept" / study / "study-summary.json"
    wait_until(summary_path.exists, 30, "the study summary")
    summary = json.loads(summary_path.read_text())
    assert summary["instances"] == 5
    assert summary["outcomes"] == {"accept": 1 + len(FAULTS), "quarantine": 1 + len(FAULTS)}
    raised = [r for f in FAULTS for r in by_uid[sent[f]]["reasons"]] + ["not-frontal-chest"]  # + the lateral film
    assert summary["reasons"] == {r: raised.count(r) for r in sorted(set(raised))}
    assert {"flipped", "inverted", "rotated", "not-frontal-chest"} <= set(summary["reasons"])
    assert summary["usable"] is True and summary["no_frontal_chest_accepted"] is False
    corrected = {by_uid[sent[f]]["corrected"]["sop_instance_uid"] for f in FAULTS}
    assert set(summary["accepted"]) == {sent["good"], *corrected}
    assert len(summary["derived"]) == len(FAULTS)
    metrics = gate.metrics()
    assert metrics['filmgate_studies_total{outcome="usable"}'] == 1.0
    index = DecisionIndex(gate.root / "spool" / "state" / "index.sqlite")  # the index links the pair as well
    for fault in FAULTS:
        derived_uid = by_uid[sent[fault]]["corrected"]["sop_instance_uid"]
        row = index.get(index.ids_of(derived_uid)[0])
        assert row["outcome"] == "accept" and row["routed"] == "accept"
    studies, _ = index.studies()
    assert studies[0]["summary"]["instances"] == 5
    assert metrics['filmgate_corrected_total{result="accepted"}'] == float(len(FAULTS))
    assert gate.stop() == 0


def test_a_quarantined_study_tells_the_pacs_by_an_iocm_rejection_note(tmp_path, films):
    """With IOCM on for `rotated`, a study of a good film and a rotated one makes one Key Object Selection
    "Rejected for Quality Reasons" that reaches the sending PACS (a real Orthanc), references the rotated instance
    only, and passes dciodvfy; a study with nothing rejected makes no note."""
    study, clean_study = generate_uid(), generate_uid()
    good = _restudy(films["good"][0], tmp_path / "good.dcm", study)
    rotated = _restudy(films["rotated"][0], tmp_path / "rotated.dcm", study)
    _restudy(films["good"][0], tmp_path / "clean.dcm", clean_study)

    port = free_port()
    pacs = Orthanc.from_deploy("hospital", tmp_path / "orthanc", {"filmgate": {"Host": "127.0.0.1", "Port": port}})
    try:
        root = tmp_path / "gate"
        gate = Gate.create(
            root, dicom_port=port,
            iocm={"enabled": True, "reasons": ["rotated"], "destination": "pacs"},
            review={"enabled": True, "users": [{"name": "ann", "role": "reviewer", "password_hash": ANN_HASH}]},
            studies={"stable_seconds": 1.0},
            destinations={
                "accept": {"type": "folder", "path": str(root / "accept"), "layout": "{SOPInstanceUID}.dcm"},
                "quarantine": {"type": "folder", "path": str(root / "quarantine"),
                               "layout": "{reasons}/{SOPInstanceUID}.dcm"},
                "pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                         "calling_ae": "FILMGATE", "retries": 3, "backoff_initial": 0.5},
            },
        ).start()  # fmt: skip
        storescu([tmp_path / "good.dcm", tmp_path / "rotated.dcm", tmp_path / "clean.dcm"], gate.dicom_port)
        gate.wait_delivered(3)

        def notes() -> list[str]:
            ids = pacs.get("/instances")
            return [i for i in ids if pacs.get(f"/instances/{i}/simplified-tags")["Modality"] == "KO"]

        found = wait_until(notes, 60, "a rejection note at the PACS")
        assert len(found) == 1
        tags = pacs.get(f"/instances/{found[0]}/tags?simplify")
        assert tags["StudyInstanceUID"] == study and tags["PatientID"] == "TEST-0001"
        title = tags["ConceptNameCodeSequence"][0]
        assert (title["CodeValue"], title["CodingSchemeDesignator"]) == ("113001", "DCM")
        evidence = tags["CurrentRequestedProcedureEvidenceSequence"][0]
        referenced = [s["ReferencedSOPInstanceUID"] for series in evidence["ReferencedSeriesSequence"]
                      for s in series["ReferencedSOPSequence"]]  # fmt: skip
        assert referenced == [rotated] and good not in referenced
        content = [i["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"] for i in tags["ContentSequence"]
                   if i.get("ValueType") == "IMAGE"]  # fmt: skip
        assert content == [rotated]
        kos = tmp_path / "note.dcm"
        kos.write_bytes(pacs.get_bytes(f"/instances/{found[0]}/file"))
        assert dciodvfy_errors(kos) == []
        assert gate.metrics()['filmgate_rejection_notes_total{destination="pacs"}'] == 1.0
        # Released from review: delivered to the accept route, and the node says that the PACS still hides it.
        index = DecisionIndex(root / "spool" / "state" / "index.sqlite")
        iid = index.ids_of(rotated)[0]
        gate.api_json(f"/api/instances/{iid}/release", "ann", ANN_PASSWORD, method="POST", body=b"{}")
        wait_until(lambda: "IOCM rejection note" in gate.log(), 10, "the release's log line about the note")
        assert gate.stop() == 0
        # The decision index records the note on the rejected instance, and the audit trail says so.
        logged = [n for n in index.get(index.ids_of(rotated)[0])["notes_log"] if n["kind"] == "iocm-rejection"]
        assert [n["data"]["sop_instance_uid"] for n in logged] == [tags["SOPInstanceUID"]]
        assert not [n for n in index.get(index.ids_of(good)[0])["notes_log"] if n["kind"] == "iocm-rejection"]
        events = [json.loads(line) for line in (root / "spool" / "audit.jsonl").read_text().splitlines()]
        queued = [e for e in events if e["event"] == "rejection-note-queued"]
        assert len(queued) == 1 and queued[0]["sop_instance_uids"] == [rotated]
        released = [e for e in events if e["event"] == "released"]
        assert released[0]["rejection_notes"] == [tags["SOPInstanceUID"]] and released[0]["user"] == "ann"
        assert not any("TEST-0001" in json.dumps(e) or "Test^Film" in json.dumps(e) for e in events)
    finally:
        pacs.stop()
