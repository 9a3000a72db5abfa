"""The deployment picture for real: hospital Orthanc -> filmgate -> research Orthanc, scraped by Prometheus.

Real Orthanc servers (Debian's package) run from deploy/orthanc/*.json with AE title checks on (called AE checked,
unknown AE titles may not store, and, here, peer addresses checked too), on loopback ports chosen by the test. The
hospital Orthanc holds one study made from real `val` films; the test asks it through its REST API to send the study
to filmgate (`/modalities/filmgate/store`). filmgate runs deploy/filmgate/with-orthanc.yaml (hosts, ports and paths
changed to the test's) and forwards accepted films to the research Orthanc. The research Orthanc's REST API must then
hold exactly the clean frontal films, bytes intact; everything else must be in the quarantine folder with the
expected reason; nothing lost, nothing twice. A real Prometheus loads deploy/prometheus/rules, scrapes the node, and
its queries return the decisions made; every Grafana dashboard query runs on it without error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from filmgate_training.datasets import data_root
from tests.helpers import (
    DEPLOY,
    REPO,
    FilmgateNode,
    Orthanc,
    Prometheus,
    free_port,
    http,
    metrics_names_in_contract,
    spool_drained,
    tool,
    wait_for,
    wait_until,
)
from tests.ops.test_deploy_files import dashboard_queries

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MODELS = Path(os.environ.get("FILMGATE_TEST_MODELS", REPO / "models"))


@dataclass(frozen=True)
class Film:
    """One instance of the test study: which real film, how it is altered, and what the gate must do with it."""

    key: str
    source: str  # path under the data folder
    transform: str  # none, rot90, invert
    accept: bool
    reason: str | None = None  # a reason that must be among the quarantine reasons


# Two adult frontal chest films (one CR-like PA from Hannover, one NIH AP), the same films rotated or inverted, a
# lateral chest film and a knee film. Sources differ so that the accepted films are not one scanner's look.
FILMS = (
    Film("frontal-pa", "images/hannover/png_0957ce54.jpg", "none", True),
    Film("frontal-ap", "images/nih-cxr14/no_finding_00001385_003.jpg", "none", True),
    Film("rotated", "images/nih-cxr14/no_finding_00001385_003.jpg", "rot90", False, "rotated"),
    Film("inverted", "images/hannover/png_0957ce54.jpg", "invert", False, "inverted"),
    Film("lateral", "images/chexpert/patient64558_study1_view2_lateral.jpg", "none", False, "not-frontal-chest"),
    Film("knee", "images/knee-oai/KL0_test_9154214L.png", "none", False, "not-frontal-chest"),
)


def _make_dicom(film: Film, study_uid: str, number: int, path: Path) -> tuple[str, bytes]:
    """A DX For Presentation instance (8-bit MONOCHROME2, uncompressed) of ``film``; returns its UID and pixels."""
    img = cv2.imread(str(data_root() / film.source), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f"cannot read {film.source}"
    if film.transform == "rot90":
        img = np.ascontiguousarray(np.rot90(img))
    elif film.transform == "invert":
        img = 255 - img
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Ops^Test"
    ds.PatientID = "OPS-0001"
    ds.PatientAge = "045Y"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyID = "1"
    ds.AccessionNumber = "OPS1"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.SeriesDescription = film.key
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop_uid, img.tobytes()


def _pixel_hash(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data))
    return hashlib.sha256(ds.PixelData).hexdigest()


def _filmgate_config(tmp: Path, research_aet: str, research_port: int, port: int) -> dict:
    """deploy/filmgate/with-orthanc.yaml with the test's loopback hosts, ports and folders; nothing else changed."""
    cfg = yaml.safe_load((DEPLOY / "filmgate" / "with-orthanc.yaml").read_text())
    cfg["listener"]["host"] = "127.0.0.1"
    cfg["listener"]["port"] = port
    # The hospital may send from loopback only (the deploy file leaves hosts open: Compose addresses change).
    for rule in cfg["listener"]["allow"]:
        if rule["ae_title"] == "HOSPITAL":
            rule["hosts"] = ["127.0.0.1"]
    cfg["spool"]["path"] = str(tmp / "spool")
    cfg["detectors"]["models_dir"] = str(MODELS)
    dest = cfg["destinations"]["research-pacs"]
    assert dest["ae_title"] == research_aet
    dest.update(host="127.0.0.1", port=research_port, dead_letter=str(tmp / "dead-letter"), backoff_initial=0.5)
    cfg["destinations"]["quarantine"]["path"] = str(tmp / "quarantine")
    cfg["http"]["host"] = "127.0.0.1"
    cfg["http"]["port"] = free_port()
    return cfg


@pytest.fixture
def stack(tmp_path):
    """research Orthanc, filmgate, hospital Orthanc and Prometheus, all real, stopped in reverse order."""
    started = []
    try:
        # The research Orthanc must know filmgate's calling AE and address before filmgate starts delivering.
        fg_port = free_port()
        research = Orthanc.from_deploy(
            "research", tmp_path / "research", {"filmgate": {"Host": "127.0.0.1", "Port": fg_port}}
        )
        started.append(research)
        cfg = _filmgate_config(tmp_path / "filmgate", research.aet, research.dicom_port, fg_port)
        node = FilmgateNode(cfg, tmp_path / "filmgate")
        started.append(node)
        hospital = Orthanc.from_deploy(
            "hospital", tmp_path / "hospital", {"filmgate": {"Host": "127.0.0.1", "Port": cfg["listener"]["port"]}}
        )
        started.append(hospital)
        prom = Prometheus(f"127.0.0.1:{cfg['http']['port']}", tmp_path / "prometheus")
        started.append(prom)
        prom.wait_scraping()
        yield {"research": research, "node": node, "hospital": hospital, "prom": prom, "cfg": cfg}
    finally:
        for s in reversed(started):
            s.stop()


def _quarantined(folder: Path) -> dict[str, dict]:
    """SOP Instance UID -> sidecar (reasons, scores, ...) of every film in the quarantine folder; each film once."""
    out: dict[str, dict] = {}
    for dcm in sorted(folder.rglob("*.dcm")):
        uid = pydicom.dcmread(dcm, stop_before_pixels=True).SOPInstanceUID
        assert uid not in out, f"{uid} quarantined twice: {dcm}"
        sidecar = dcm.with_suffix(".json")
        assert sidecar.is_file(), f"no sidecar next to {dcm}"
        out[uid] = json.loads(sidecar.read_text())
    return out


def test_hospital_pacs_to_research_pacs_through_filmgate(stack, tmp_path):
    assert any(MODELS.glob("*/manifest.json")), f"no shipped models under {MODELS}"
    hospital, research, node, prom, cfg = (stack[k] for k in ("hospital", "research", "node", "prom", "cfg"))

    # --- the container health check (C-ECHO as FILMGATE-HC + /healthz) passes against this configuration
    hc = subprocess.run(
        [tool("filmgate"), "healthcheck", "--config", str(node.config_path)], capture_output=True, text=True, timeout=30
    )
    assert hc.returncode == 0, hc.stdout + hc.stderr

    # --- the study: one DICOM file per film
    study_uid = generate_uid()
    made = {f.key: _make_dicom(f, study_uid, i + 1, tmp_path / f"{f.key}.dcm") for i, f in enumerate(FILMS)}

    # --- AE checks are on: an unknown AE title may not store into the research PACS
    probe = tmp_path / "probe.dcm"
    _make_dicom(FILMS[0], generate_uid(), 99, probe)
    res = subprocess.run(
        [tool("storescu"), "-aet", "STRANGER", "-aec", research.aet, "127.0.0.1", str(research.dicom_port), str(probe)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=60,
    )
    assert res.returncode != 0 or "Rejected" in res.stdout + res.stderr
    assert research.get("/instances") == [], "the research PACS accepted a store from an unknown AE title"

    # --- filmgate's allow-list is on too: the research PACS (AE RESEARCH, not on it) cannot even echo the node
    status, body = http("POST", research.base + "/modalities/filmgate/echo", {}, auth=research.AUTH)
    assert status != 200, f"filmgate accepted an association from {research.aet}: {body!r}"
    rejected = [
        s.value
        for fam in text_string_to_metric_families(node.metrics())
        for s in fam.samples
        if s.name == "filmgate_associations_total" and s.labels == {"calling_ae": research.aet, "result": "rejected"}
    ]
    assert rejected == [1.0], f"the refusal is counted as a rejected association of {research.aet}: {rejected}"

    # --- load the study into the hospital PACS, then make it push the study to filmgate
    for f in FILMS:
        hospital.post("/instances", (tmp_path / f"{f.key}.dcm").read_bytes())
    (study_id,) = hospital.get("/studies")
    echo = hospital.post("/modalities/filmgate/echo", {})
    assert echo == {} or echo is None, echo
    t0 = time.monotonic()
    job = hospital.post("/modalities/filmgate/store", {"Resources": [study_id], "Synchronous": True})
    assert job["InstancesCount"] == len(FILMS) and job["FailedInstancesCount"] == 0, job

    # --- wait until every film is decided and delivered
    accepted = {made[f.key][0] for f in FILMS if f.accept}
    quarantine_dir = Path(cfg["destinations"]["quarantine"]["path"])

    def settled():
        q = _quarantined(quarantine_dir) if quarantine_dir.exists() else {}
        return len(research.get("/instances")) + len(q) >= len(FILMS)

    wait_until(settled, 120, f"all films delivered (filmgate log:\n{node.process.tail(30)})", interval=0.5)
    # filmgate's spool and outbox are empty: nothing more can be sent, so a duplicate delivery would be here now.
    wait_until(lambda: spool_drained(Path(cfg["spool"]["path"])), 60, "filmgate's spool and outbox to drain")
    elapsed = time.monotonic() - t0

    # --- the research PACS holds exactly the clean frontal films, once each, pixels intact
    arrived = research.sop_instance_uids()
    quarantined = _quarantined(quarantine_dir)
    names = {made[f.key][0]: f.key for f in FILMS}
    report = {
        "research": sorted(names.get(u, u) for u in arrived),
        "quarantine": {names.get(u, u): s.get("reasons") for u, s in quarantined.items()},
    }
    assert len(arrived) == len(set(arrived)), f"duplicates in the research PACS: {report}"
    assert set(arrived) == accepted, f"research PACS must hold exactly the clean frontal films: {report}"
    for oid in research.get("/instances"):
        data = research.get_bytes(f"/instances/{oid}/file")
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert _pixel_hash(data) == hashlib.sha256(made[names[uid]][1]).hexdigest(), f"{names[uid]}: pixels changed"
    # ... and every other film is in quarantine with the expected reason; none lost, none in both places
    assert set(quarantined) == {made[f.key][0] for f in FILMS if not f.accept}, report
    for f in FILMS:
        if not f.accept:
            reasons = quarantined[made[f.key][0]].get("reasons", [])
            assert f.reason in reasons, f"{f.key}: expected reason {f.reason}, got {reasons} ({report})"
    assert not list(Path(cfg["destinations"]["research-pacs"]["dead_letter"]).rglob("*.dcm")), "dead letters"

    # --- Prometheus scraped the node: its queries return the decisions made
    n_acc, n_q = len(accepted), len(FILMS) - len(accepted)

    def decisions():
        rows = prom.query('sum by (outcome) (filmgate_decisions_total{job="filmgate", calling_ae="HOSPITAL"})')
        got = {r["metric"]["outcome"]: float(r["value"][1]) for r in rows}
        want = {k: v for k, v in (("accept", n_acc), ("quarantine", n_q)) if v}
        return got if got == want else None

    def value(query: str) -> float:
        rows = prom.query(query)
        return float(rows[0]["value"][1]) if rows else 0.0

    def scraped():
        # One scrape can fall between a film's decision and its delivery: wait for a scrape that holds the deliveries
        # (and end-to-end times) of the films the research PACS already holds, not only the decisions.
        attempts = value('sum(filmgate_delivery_attempts_total{job="filmgate", destination="research-pacs"})')
        e2e = value('sum(filmgate_end_to_end_seconds_count{job="filmgate"})')
        return decisions() if attempts >= n_acc and e2e == len(FILMS) else None

    wait_until(scraped, 30, "Prometheus to report the decisions and deliveries", interval=0.5)
    received = prom.query('sum(filmgate_instances_received_total{job="filmgate", calling_ae="HOSPITAL"})')
    assert float(received[0]["value"][1]) == len(FILMS)
    reasons = prom.query('sum by (reason) (filmgate_quarantine_reasons_total{job="filmgate"})')
    by_reason = {r["metric"]["reason"]: float(r["value"][1]) for r in reasons}
    for f in FILMS:
        if not f.accept:
            assert by_reason.get(f.reason, 0) >= 1, by_reason
    # each accepted film was sent once: as many attempts as films, no retry, no failure
    attempts = prom.query('sum(filmgate_delivery_attempts_total{job="filmgate", destination="research-pacs"})')
    assert float(attempts[0]["value"][1]) >= n_acc
    for metric in ("delivery_retries_total", "delivery_failures_total", "dead_letters_total"):
        (row,) = prom.query(f'sum(filmgate_{metric}{{job="filmgate"}}) or vector(0)')
        assert float(row["value"][1]) == 0, metric
    models = prom.query('filmgate_model_info{job="filmgate"}')
    assert models and all(r["metric"]["provider"] for r in models), models
    e2e = prom.query('sum(filmgate_end_to_end_seconds_count{job="filmgate"})')
    assert float(e2e[0]["value"][1]) == len(FILMS)
    assert prom.query('filmgate_ready{job="filmgate"}')[0]["value"][1] == "1"

    # every metric of the contract is exported by the node (labelled series appear on first use: check the TYPE lines)
    types = {}
    for line in node.metrics().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    for name in metrics_names_in_contract():
        assert name in types or name.removesuffix("_total") in types, f"{name} is not exported by filmgate serve"
    series = {m["__name__"] for m in prom.api("series", **{"match[]": '{job="filmgate"}'})}
    assert {"filmgate_decisions_total", "filmgate_end_to_end_seconds_bucket", "filmgate_spool_depth"} <= series

    # the deploy rules load and evaluate without error on real data; nothing fires on this healthy run
    groups = prom.api("rules")["groups"]
    assert groups and all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    firing = [r["name"] for g in groups for r in g["rules"] if r.get("type") == "alerting" and r["state"] == "firing"]
    assert firing == [], firing

    # every Grafana panel query runs on this Prometheus (variables as "All")
    for expr in dashboard_queries():
        q = expr.replace("$instance", ".*").replace("$calling_ae", ".*").replace("$__rate_interval", "1m")
        rows = prom.query(q)
        if "rate(" not in q and "increase(" not in q:  # gauges: data right away (rates need a longer history)
            assert rows, f"dashboard query returned nothing: {q}"

    # SIGTERM: a clean exit 0 after the run
    assert node.stop() == 0, node.process.tail()
    print(f"\n{len(FILMS)} films hospital -> filmgate -> research/quarantine in {elapsed:.1f} s: {report}")


def test_dead_letters_raise_the_alert_and_the_documented_resend_delivers_them(tmp_path):
    """The research PACS is down: the accepted film is retried, dead-lettered, never reported delivered; the real
    Prometheus fires FilmgateDeadLetters (and DeliveriesFailing goes pending) on the node's real series; then the
    re-send command of docs/OPERATIONS.md, run as written, delivers it once the PACS is up."""
    assert any(MODELS.glob("*/manifest.json")), f"no shipped models under {MODELS}"
    research_aet = json.loads((DEPLOY / "orthanc" / "research.json").read_text())["DicomAet"]
    research_port, fg_port = free_port(), free_port()
    cfg = _filmgate_config(tmp_path / "filmgate", research_aet, research_port, fg_port)
    # A few seconds of retries, so that Prometheus (scraping every second) sees the failures grow.
    cfg["destinations"]["research-pacs"].update(retries=3, backoff_initial=0.7, backoff_max=2.0, timeout=5.0)
    started = []
    try:
        node = FilmgateNode(cfg, tmp_path / "filmgate")
        started.append(node)
        prom = Prometheus(f"127.0.0.1:{cfg['http']['port']}", tmp_path / "prometheus")
        started.append(prom)
        prom.wait_scraping()  # so that it sees the failures grow, not only their end

        film = FILMS[0]
        assert film.accept
        film_path = tmp_path / "film.dcm"
        sop_uid, _ = _make_dicom(film, generate_uid(), 1, film_path)
        res = subprocess.run(
            [
                tool("storescu"),
                "-aet",
                "HOSPITAL",
                "-aec",
                "FILMGATE",
                "127.0.0.1",
                str(fg_port),
                str(tmp_path / "film.dcm"),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        dead = Path(cfg["destinations"]["research-pacs"]["dead_letter"])
        # the file is placed first, then its note: wait for both
        wait_until(lambda: list(dead.glob("*.json")), 60, f"a dead letter in {dead}:\n{node.process.tail(20)}")
        (letter,) = dead.glob("*.dcm")
        assert pydicom.dcmread(letter, stop_before_pixels=True).SOPInstanceUID == sop_uid
        note = json.loads(letter.with_suffix(".json").read_text())
        assert note["destination"] == "research-pacs" and note["attempts"] == 4, note

        def alert_states():
            alerts = prom.api("alerts")["alerts"]
            return {a["labels"]["alertname"]: a["state"] for a in alerts if a["labels"].get("destination")}

        def raised() -> bool:
            states = alert_states()
            return (states.get("FilmgateDeadLetters") == "firing"  # fires at once
                    and states.get("FilmgateDeliveriesFailing") in ("pending", "firing"))  # fires after 10 minutes

        series = '{job="filmgate", destination="research-pacs"}'
        wait_for(raised, 30, lambda: f"alerts raised: {alert_states()}; series: {prom.query(series)}", interval=0.5)
        (row,) = prom.query('sum(filmgate_dead_letters_total{job="filmgate", destination="research-pacs"})')
        assert float(row["value"][1]) == 1

        # The PACS is back: run the documented re-send command with this test's address, port and folder.
        research = Orthanc.from_deploy(
            "research",
            tmp_path / "research",
            {"filmgate": {"Host": "127.0.0.1", "Port": fg_port}},
            dicom_port=research_port,
        )
        started.append(research)
        doc = (REPO / "docs" / "OPERATIONS.md").read_text()
        (line,) = [ln for ln in doc.splitlines() if ln.startswith("filmgate resend") and "dead-letter/research" in ln]
        argv = shlex.split(line.split("#")[0])
        argv = [
            {"/etc/filmgate/filmgate.yaml": str(node.config_path)}.get(a, a).replace(
                "/var/lib/filmgate/spool/dead-letter/research-pacs", str(dead)
            )
            for a in argv
        ]
        argv[0] = tool("filmgate")
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
        assert not list(dead.glob("*.dcm")), "resend left the dead letter in place"
        wait_until(research.sop_instance_uids, 60, f"the re-sent film at the research PACS:\n{node.process.tail(20)}")
        assert research.sop_instance_uids() == [sop_uid]
    finally:
        for s in reversed(started):
            s.stop()
