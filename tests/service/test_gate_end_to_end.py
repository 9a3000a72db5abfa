"""The gate end to end: DCMTK storescu sends real films to `filmgate serve`; every instance lands in exactly one
destination with its bytes intact, clear cases are decided right, bad input never crashes the node, and the metrics
count what was sent. One server for the whole module (the slow part is starting it and loading the models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from filmgate import cli
from filmgate_training.datasets import select
from tests.helpers import (
    CR_STORAGE,
    DCMTK_ENV,
    FILMGATE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    REPO,
    Gate,
    dataset_bytes,
    htj2k,
    send_file_raw,
    sha,
    storescu,
    wait_for,
    write_with_meta,
)

ALLOW = [
    {"ae_title": "TESTSCU", "hosts": ["127.0.0.1"]},
    {"ae_title": "FAKESCU"},
    {"ae_title": "RAWSCU", "hosts": ["127.0.0.0/8"]},
]


@pytest.fixture(scope="module")
def gate(tmp_path_factory, models_dir):
    g = Gate.create(
        tmp_path_factory.mktemp("gate"),
        accept_layout="{calling_ae}/{SOPInstanceUID}.dcm",
        quarantine_layout="{reasons}/{calling_ae}/{SOPInstanceUID}.dcm",
        listener={"allow": ALLOW},
    )
    g.start()
    yield g
    assert g.stop() == 0, g.log()[-3000:]


@pytest.fixture(scope="module")
def run(gate, made_films, data_dir, tmp_path_factory):
    """Send everything once; returns what was sent and the delivered sidecars by SOP Instance UID."""
    work = tmp_path_factory.mktemp("bad")
    shared = sorted((data_dir / "dicom").glob("*.dcm"))
    fake = [p for p in shared if "Fake_MONOHR1" in p.name]
    shared_main = [p for p in shared if p not in fake]
    errors = storescu([f.path for f in made_films] + shared_main, gate.dicom_port, aet="TESTSCU")
    errors += storescu(fake, gate.dicom_port, aet="FAKESCU")
    # A file cut in the middle of its pixel data: the header parses, so it is stored, then found undecodable.
    normal = next(f for f in made_films if f.note == "normal-0")
    data = normal.path.read_bytes()
    trunc_uid = generate_uid()
    ds = pydicom.dcmread(normal.path)
    ds.SOPInstanceUID = trunc_uid
    ds.file_meta.MediaStorageSOPInstanceUID = trunc_uid
    full = work / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    truncated = work / "truncated.dcm"
    truncated.write_bytes(full.read_bytes()[: len(data) // 2])
    trunc_status = send_file_raw(gate.dicom_port, truncated)
    # Random bytes as a dataset: cannot be parsed, so 0xC210 and nothing stored.
    rng = np.random.default_rng(7)
    garbage = write_with_meta(work / "random.dcm", rng.bytes(20000), CR_STORAGE, generate_uid())
    random_status = send_file_raw(gate.dicom_port, garbage)
    # Wait for every instance by UID (a count could be reached early by an instance nobody expected).
    expected: dict[str, int] = defaultdict(int)
    for film in made_films:
        expected[film.uid] += 1
    for path in shared:
        expected[str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)] += 1
    if trunc_status == 0:
        expected[trunc_uid] += 1

    def delivered() -> dict[str, list[dict]] | None:
        found: dict[str, list[dict]] = defaultdict(list)
        for rec in gate.sidecars():
            found[rec["sop_instance_uid"]].append(rec)
        return found if all(len(found[uid]) >= n for uid, n in expected.items()) else None

    wait_for(delivered, 180, "every instance delivered")
    gate.wait_drained()  # the spool is empty: nothing more can be delivered, so a duplicate would be here now
    by_uid = delivered()
    records = [r for recs in by_uid.values() for r in recs]
    return {
        "errors": errors,
        "records": records,
        "by_uid": by_uid,
        "shared": shared,
        "trunc_uid": trunc_uid,
        "trunc_status": trunc_status,
        "random_status": random_status,
    }


def test_storescu_sent_everything(run):
    assert run["errors"] == []


def test_every_made_film_lands_once_with_its_bytes(run, made_films):
    for film in made_films:
        recs = run["by_uid"][film.uid]
        assert len(recs) == 1, (film.note, recs)
        got, sent = dataset_bytes(Path(recs[0]["_path"]).read_bytes()), dataset_bytes(film.path.read_bytes())
        if recs[0]["transfer_syntax"] == "1.2.840.10008.1.2.1.99":
            # storescu deflates while it sends (flush points follow its network buffers), so the compressed bytes
            # differ from the file's from run to run; what they inflate to must not.
            got, sent = zlib.decompress(got, -zlib.MAX_WBITS), zlib.decompress(sent, -zlib.MAX_WBITS)
        assert sha(got) == sha(sent), film.note
        # The sidecar carries no patient name or ID.
        text = Path(recs[0]["_path"]).with_suffix(".json").read_text()
        assert "Test^Film" not in text and "TEST-0001" not in text


def test_made_films_are_decided_right(run, made_films):
    wrong = []
    for film in made_films:
        rec = run["by_uid"][film.uid][0]
        ok = rec["decision"] == film.expect or film.expect == "any"
        ok &= film.reason is None or film.reason in rec["reasons"]
        ok &= not set(film.absent) & set(rec["reasons"])
        ok &= rec["_folder"] == ("accept" if rec["decision"] == "accept" else "quarantine")
        if not ok:
            wrong.append((film.note, rec["decision"], rec["reasons"], rec["scores"]))
    assert not wrong, wrong


def test_compressed_films_were_received_compressed(run, made_films):
    syntaxes = {f.note: run["by_uid"][f.uid][0]["transfer_syntax"] for f in made_films}
    assert syntaxes["normal-jpeg-lossless"] == "1.2.840.10008.1.2.4.70"
    assert syntaxes["normal-jpeg-ls"] == "1.2.840.10008.1.2.4.80"
    assert syntaxes["normal-j2k"] == "1.2.840.10008.1.2.4.90"
    assert syntaxes["normal-rle"] == "1.2.840.10008.1.2.5"
    assert syntaxes["normal-deflated"] == "1.2.840.10008.1.2.1.99"


def test_real_dicom_files_land_once_with_their_pixels(run):
    for path in run["shared"]:
        src = pydicom.dcmread(path, force=True)
        recs = run["by_uid"][str(src.SOPInstanceUID)]
        if "mlmed__" in path.name:  # the real film and its relabelled copy share one UID; sent by two AEs
            recs = [r for r in recs if r["calling_ae"] == ("FAKESCU" if "Fake" in path.name else "TESTSCU")]
        assert len(recs) == 1, (path.name, recs)
        got = pydicom.dcmread(recs[0]["_path"]).PixelData
        if len(src.PixelData) % 2:  # storescu pads an odd-length value to even length, as the standard requires
            assert got[-1:] == b"\x00"
            got = got[:-1]
        assert sha(got) == sha(src.PixelData), path.name


def _shared_record(run, name: str, aet: str = "TESTSCU") -> dict:
    path = next(p for p in run["shared"] if name in p.name)
    uid = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
    return next(r for r in run["by_uid"][uid] if r["calling_ae"] == aet)


def test_real_monochrome1_chest_is_not_called_inverted(run):
    rec = _shared_record(run, "RG1_J2KI")
    assert "inverted" not in rec["reasons"], rec["scores"]


def test_relabelled_monochrome1_film_is_inverted(run):
    rec = _shared_record(run, "Fake_MONOHR1", aet="FAKESCU")
    assert rec["decision"] == "quarantine" and "inverted" in rec["reasons"], rec["scores"]


def test_ct_is_not_accepted(run):
    for name in ("CT-MONO2-16-ankle", "GH342"):
        rec = _shared_record(run, name)
        assert rec["decision"] == "quarantine" and "modality" in rec["reasons"], (name, rec["reasons"])


def test_sidecar_has_models_scores_and_times(run, made_films):
    rec = run["by_uid"][made_films[0].uid][0]
    assert {m["name"] for m in rec["models"]} >= {"orientation", "inversion"}
    assert all(m["version"] and m["provider"] for m in rec["models"])
    assert set(rec["scores"]) >= {"orientation", "inversion"}
    assert {"received_at", "decided_at", "delivered_at", "timings_ms"} <= set(rec)
    assert {f["detector"]: f.get("predicted") for f in rec["findings"]}["orientation"] in (
        "upright", "rot90", "rot180", "rot270",
    )  # fmt: skip
    # What the listener knew travels in the instance's arrival record in the spool, read once by the worker.
    assert rec["calling_ae"] == "TESTSCU" and rec["called_ae"] == "FILMGATE" and rec["peer_address"] == "127.0.0.1"
    assert rec["timings_ms"]["store"] > 0 and rec["series_instance_uid"]


def test_truncated_file_is_quarantined_undecodable(run):
    assert run["trunc_status"] == 0x0000  # header intact: stored durably first, judged later
    (rec,) = run["by_uid"][run["trunc_uid"]]
    assert rec["decision"] == "quarantine" and "undecodable" in rec["reasons"]
    assert rec["notes"]["error"]


def test_random_bytes_are_refused_and_the_node_keeps_serving(run, gate, made_films):
    assert run["random_status"] == 0xC210
    assert send_file_raw(gate.dicom_port, made_films[0].path) == 0x0000
    echo = subprocess.run(
        ["echoscu", "-aet", "TESTSCU", "-aec", "FILMGATE", "127.0.0.1", str(gate.dicom_port)],
        env=DCMTK_ENV, capture_output=True, timeout=30,
    )  # fmt: skip
    assert echo.returncode == 0


def test_refused_sender(run, gate, made_films):
    before = gate.metrics().get('filmgate_associations_total{calling_ae="INTRUDER",result="rejected"}', 0)
    errors = storescu([made_films[0].path], gate.dicom_port, aet="INTRUDER")
    assert errors, "an AE title not in the allow-list must be refused"
    after = gate.metrics()['filmgate_associations_total{calling_ae="INTRUDER",result="rejected"}']
    assert after == before + 1
    assert "refused association from AE 'INTRUDER'" in gate.log()


def test_metrics_count_what_was_sent(run, gate, made_films):
    m = gate.metrics()
    n_test = len(made_films) + len(run["shared"]) - 1  # all but the relabelled copy came from TESTSCU
    assert m['filmgate_instances_received_total{calling_ae="TESTSCU"}'] == n_test
    assert m['filmgate_instances_received_total{calling_ae="FAKESCU"}'] == 1
    assert m['filmgate_bytes_received_total{calling_ae="TESTSCU"}'] > 0
    assert m['filmgate_store_failures_total{status="0xC210"}'] >= 1
    for aet in ("TESTSCU", "FAKESCU"):
        recs = [r for r in run["records"] if r["calling_ae"] == aet]
        for outcome in ("accept", "quarantine"):
            n = sum(r["decision"] == outcome for r in recs)
            assert m.get(f'filmgate_decisions_total{{calling_ae="{aet}",outcome="{outcome}"}}', 0) == n
        reasons = defaultdict(int)
        for r in recs:
            for reason in r["reasons"]:
                reasons[reason] += 1
        for reason, n in reasons.items():
            assert m[f'filmgate_quarantine_reasons_total{{calling_ae="{aet}",reason="{reason}"}}'] == n
        # every reason the gate can raise has a series for each sender, 0 until it first occurs (no "no data")
        for reason in ("rotated", "inverted", "flipped", "not-frontal-chest", "pediatric", "atypical", "undecodable",
                       "modality"):  # fmt: skip
            assert m[f'filmgate_quarantine_reasons_total{{calling_ae="{aet}",reason="{reason}"}}'] == reasons[reason]
    assert m['filmgate_store_failures_total{status="0xA700"}'] == 0  # declared at start, no failure to write
    assert m["filmgate_store_seconds_count"] >= n_test
    assert m["filmgate_end_to_end_seconds_count"] >= len(run["records"])
    assert any(k.startswith("filmgate_model_info{") and 'model="orientation"' in k for k in m)
    assert any(k.startswith('filmgate_decode_seconds_count{transfer_syntax="JPEG 2000') for k in m)
    assert m["filmgate_ready"] == 1
    assert gate.http_get("/healthz")[0] == 200 and gate.http_get("/readyz")[0] == 200
    # The merged exposition (listener process + worker processes) is valid for Prometheus.
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (scripts/bootstrap with FILMGATE_OPS=1 installs it)"
    check = subprocess.run(
        [promtool, "check", "metrics"], input=gate.http_get("/metrics")[1], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = [line.split()[2] for line in gate.http_get("/metrics")[1].splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "each metric family once"


def test_no_patient_data_in_logs(run, gate, made_films):
    log = gate.log()
    assert made_films[0].uid not in log and "Test^Film" not in log and "TEST-0001" not in log


def test_healthcheck_command(gate):
    ok = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "healthcheck", "--config", str(gate.config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_inspect_into_a_pipe_its_reader_closes_stops_quietly(made_films):
    """`filmgate inspect *.dcm | head -1`, through a real pipe: once the reader has gone, inspect stops with the status
    a Unix tool killed by SIGPIPE has (141), no traceback and no "Exception ignored" at exit. Only a closed stdout
    counts as that: a broken pipe of the command's own (a peer's socket) still reports itself."""
    files = [str(f.path) for f in made_films] * 20
    proc = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" inspect "$@" | head -1', FILMGATE, *files],
                          capture_output=True, text=True, timeout=300, cwd="/")  # fmt: skip
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["file"] == files[0]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    read, write = os.pipe()
    try:
        assert cli._stdout_reader_gone(write) is False
        os.close(read)
        assert cli._stdout_reader_gone(write) is True
    finally:
        os.close(write)


def test_inspect_command(made_films, data_dir, models_dir):
    normal = next(f for f in made_films if f.note == "normal-0")
    rot = next(f for f in made_films if f.note == "rot90-0")
    ct = next(f for f in made_films if f.note == "ct")
    png = next(f.path for f in select(split="val", kind="frontal-chest") if f.path.suffix == ".png")
    junk = Path(normal.path).with_name("junk.bin")
    junk.write_bytes(b"not an image at all" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "inspect", str(normal.path), str(rot.path), str(ct.path), str(png),
         str(junk)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(normal.path), str(rot.path), str(ct.path), str(png), str(junk)]
    for line in lines:
        assert set(line) >= {"file", "decision", "reasons", "scores"}
    assert lines[0]["decision"] == "accept"
    assert "rotated" in lines[1]["reasons"]
    assert "modality" in lines[2]["reasons"]
    assert "modality" not in lines[3]["reasons"] and set(lines[3]["scores"]) >= {"orientation", "inversion"}
    assert lines[4]["reasons"] == ["undecodable"]


def test_the_same_instance_twice_is_harmless(run, gate, made_films):
    film = next(f for f in made_films if f.note == "normal-1")
    before = gate.metrics()['filmgate_instances_received_total{calling_ae="TESTSCU"}']
    decided = sum(v for k, v in gate.metrics().items() if k.startswith("filmgate_decisions_total{"))
    assert storescu([film.path], gate.dicom_port) == []
    wait_for(
        lambda: sum(v for k, v in gate.metrics().items() if k.startswith("filmgate_decisions_total{")) > decided,
        60, "the second copy decided",
    )  # fmt: skip
    assert gate.metrics()['filmgate_instances_received_total{calling_ae="TESTSCU"}'] == before + 1
    copies = [p for p in gate.root.rglob(f"{film.uid}.dcm")]
    assert len(copies) == 1, "delivered once, the second copy replaced the first"
    assert sha(dataset_bytes(copies[0].read_bytes())) == sha(dataset_bytes(film.path.read_bytes()))


def test_write_failure_answers_a700_and_the_node_recovers(run, gate, made_films):
    incoming = gate.root / "spool" / "incoming"
    incoming.rename(incoming.with_name("incoming.away"))
    incoming.write_bytes(b"not a folder")  # renames into it now fail, even for root
    try:
        status = send_file_raw(gate.dicom_port, made_films[0].path)
    finally:
        incoming.unlink()
        incoming.with_name("incoming.away").rename(incoming)
    assert status == 0xA700
    assert gate.metrics()['filmgate_store_failures_total{status="0xA700"}'] == 1
    assert send_file_raw(gate.dicom_port, made_films[0].path) == 0x0000
    assert gate.http_get("/readyz")[0] == 200


@pytest.mark.parametrize("lossless", [True, False], ids=["htj2k-lossless", "htj2k-lossy"])
def test_htj2k_films_are_stored_as_sent_decoded_and_decided(run, gate, made_films, tmp_path, lossless):
    """High-Throughput JPEG 2000 (encoded by OpenJPH) sent by pynetdicom (DCMTK 3.6.7's storescu cannot propose it):
    acknowledged, the received bytes delivered unchanged, decoded (no `undecodable`), and decided like the
    uncompressed film it was made from."""
    normal = next(f for f in made_films if f.note == "normal-1")
    ht = htj2k(normal.path, tmp_path / "ht.dcm", lossless=lossless)
    ds = pydicom.dcmread(ht)
    uid = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # a new instance
    ds.save_as(ht, enforce_file_format=True)
    assert send_file_raw(gate.dicom_port, ht) == 0x0000

    def delivered() -> dict | None:
        recs = [r for r in gate.sidecars() if r["sop_instance_uid"] == uid]
        return recs[0] if recs else None

    rec = wait_for(delivered, 60, "the HTJ2K film delivered")
    assert rec["transfer_syntax"] == (HTJ2K_LOSSLESS if lossless else HTJ2K)
    assert "undecodable" not in rec["reasons"]
    assert rec["decision"] == run["by_uid"][normal.uid][0]["decision"] == normal.expect
    assert sha(dataset_bytes(Path(rec["_path"]).read_bytes())) == sha(dataset_bytes(ht.read_bytes()))
