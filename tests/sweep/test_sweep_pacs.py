"""``filmgate sweep dicom://AET@host:port`` against a real Orthanc (Debian's package) holding films made from real ones.

The Orthanc runs deploy/orthanc/hospital.json (AE title checks on, our AE title FILMGATE known at loopback). It holds a
2024 study of CR and DX films (one rotated), a 2023 DX study (before --since) and a 2024 CT study (not CR/DX). The sweep
must return exactly the instances of the first study, with the decisions `filmgate inspect` gives on the same files,
by C-GET and by C-MOVE, keep no bytes unless --sort-into asks, and write them intact when it does.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pydicom
import pytest

from filmgate_training.datasets import select
from tests.helpers import (
    FILMGATE,
    Orthanc,
    committed_rows,
    film_pixels,
    free_port,
    inspect,
    make_dicom,
    read_csv,
    run_sweep,
    wait_until,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
OUTPUTS = {"results.csv", "results.parquet", "skipped.csv", "summary.json", "report.html", "sweep.sqlite",
           "sweep.sqlite-wal", "sweep.sqlite-shm", "sweep.lock"}  # fmt: skip


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    work = tmp_path_factory.mktemp("pacs")
    move_port = free_port()
    orthanc = Orthanc.from_deploy("hospital", work / "orthanc", {"filmgate": {"Host": "127.0.0.1",
                                                                               "Port": move_port}})  # fmt: skip
    films = work / "films"
    films.mkdir()
    frontal = [f.path for f in select(split="val", kind="frontal-chest") if f.pediatric == "no"][:4]
    ct = next(f.path for f in select(split="val", kind="not-radiograph") if f.modality.upper() == "CT")
    made = []  # (file, study, expected in the sweep)

    def add(px, name, study, date, **kw):
        path = films / f"{name}.dcm"
        make_dicom(px, path, study_uid=study, **kw)
        ds = pydicom.dcmread(path)
        ds.StudyDate = ds.SeriesDate = date
        ds.save_as(path)
        made.append((path, date >= "20240101" and kw.get("modality", "DX") in ("CR", "DX")))

    study_2024, study_2023, study_ct = (pydicom.uid.generate_uid() for _ in range(3))
    for i, src in enumerate(frontal[:3]):
        add(film_pixels(src), f"dx{i}", study_2024, "20240315")
    add(np.ascontiguousarray(np.rot90(film_pixels(frontal[0]))), "rotated", study_2024, "20240315")
    add(film_pixels(frontal[3]), "cr", study_2024, "20240316", modality="CR", sop_class=CR_STORAGE)
    add(film_pixels(frontal[1]), "old", study_2023, "20230510")
    add(film_pixels(ct), "ct", study_ct, "20240401", modality="CT", sop_class=CT_STORAGE)
    for path, _ in made:
        orthanc.post("/instances", path.read_bytes())
    yield {"orthanc": orthanc, "films": made, "move_port": move_port, "url": f"dicom://{orthanc.aet}@127.0.0.1:"
           f"{orthanc.dicom_port}"}  # fmt: skip
    orthanc.stop()


def _expected(pacs) -> dict[str, dict]:
    wanted = [p for p, keep in pacs["films"] if keep]
    verdicts = inspect(wanted)
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): verdicts[str(p)] | {"file": p}
            for p in wanted}  # fmt: skip


def test_pacs_sweep_by_c_get_returns_every_instance_and_keeps_no_bytes(pacs, tmp_path):
    out = tmp_path / "out"
    run_sweep(pacs["url"], "--query", "Modality=CR,DX", "--since", "2024-01-01", "--out", out)
    rows = read_csv(out / "results.csv")
    expected = _expected(pacs)
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(expected)
    for r in rows:
        want = expected[r["sop_instance_uid"]]
        assert (r["decision"], r["reasons"]) == (want["decision"], ";".join(want["reasons"])), want["file"]
        assert r["path"].endswith("/" + r["sop_instance_uid"]) and r["modality"] in ("CR", "DX")
    assert any("rotated" in r["reasons"] for r in rows)
    assert {p.name for p in out.iterdir()} <= OUTPUTS, "bytes kept without --sort-into"
    # The archive grows: a rerun judges only the new instance, in a series already judged (so it is retrieved alone,
    # by an instance-level C-GET).
    first = next(p for p, keep in pacs["films"] if keep)
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.InstanceNumber = 99
    added = tmp_path / "added.dcm"
    ds.save_as(added)
    pacs["orthanc"].post("/instances", added.read_bytes())
    pacs["films"].append((added, True))
    grown = run_sweep(pacs["url"], "--query", "Modality=CR,DX", "--since", "2024-01-01", "--out", out)
    assert json.loads((out / "summary.json").read_text())["run"]["judged_this_run"] == 1, grown.stderr
    assert sorted(r["sop_instance_uid"] for r in read_csv(out / "results.csv")) == sorted(_expected(pacs))


def test_pacs_sweep_by_c_move_sorts_the_received_bytes_intact(pacs, tmp_path):
    out, tree = tmp_path / "out", tmp_path / "sorted"
    run_sweep(pacs["url"], "--query", "Modality=CR,DX", "--since", "2024-01-01", "--out", out, "--retrieve", "move",
              "--move-port", str(pacs["move_port"]), "--sort-into", tree)  # fmt: skip
    rows = read_csv(out / "results.csv")
    expected = _expected(pacs)
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(expected)
    for r in rows:
        where = "accept" if r["decision"] == "accept" else f"quarantine/{r['reasons'].split(';')[0]}"
        got = pydicom.dcmread(tree / where / r["path"])
        sent = pydicom.dcmread(expected[r["sop_instance_uid"]]["file"])
        assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PixelData == sent.PixelData
    assert sum(1 for p in tree.rglob("*") if p.is_file()) == len(rows)


def test_pacs_sweep_interrupted_stops_the_retrieve_and_resumes(pacs, tmp_path):
    """Ctrl-C during the retrieve: the sweep stops within seconds (the C-GET is ended, the association released), and
    a rerun judges exactly the instances left: every instance once."""
    study = pydicom.uid.generate_uid()
    frontal = [f.path for f in select(split="val", kind="frontal-chest")][:20]
    for i, src in enumerate(frontal):
        path = tmp_path / f"i{i}.dcm"
        make_dicom(film_pixels(src), path, study_uid=study)
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "SWEEPINT1"
        ds.save_as(path)
        pacs["orthanc"].post("/instances", path.read_bytes())
    out = tmp_path / "out"
    args = [pacs["url"], "--query", "AccessionNumber=SWEEPINT1", "--out", str(out)]
    proc = subprocess.Popen([FILMGATE, "sweep", *args, "--jobs", "1", "--batch", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(lambda: committed_rows(out) >= 4 or proc.poll() is not None, 120, "the first rows", interval=0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    first = json.loads((out / "summary.json").read_text())["films"]
    assert 4 <= first < len(frontal)
    run_sweep(*args)
    rows = read_csv(out / "results.csv")
    assert len(rows) == len({r["sop_instance_uid"] for r in rows}) == len(frontal)
    assert json.loads((out / "summary.json").read_text())["run"]["judged_this_run"] == len(frontal) - first
