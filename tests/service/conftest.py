"""Helpers for the gate's tests: real `filmgate serve` subprocesses, real DCMTK and pynetdicom peers, real films.

Everything runs on loopback with free ports. DICOM fixtures are made here from ``val`` films (never stored in the
repo) and normalised by DCMTK, so that what ``storescu`` sends is byte-for-byte the file's dataset and the bytes
delivered can be compared by hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from filmgate.datasets import select
from filmgate.decode import decode_file

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("FILMGATE_TEST_MODELS", REPO / "models"))
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# storescu proposes only uncompressed transfer syntaxes unless told; one option per compressed syntax.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for CN=localhost (openssl), for the TLS tests."""
    cert, key = folder / "node.crt", folder / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------- bytes


def dataset_bytes(data: bytes) -> bytes:
    """The dataset part of a DICOM file (after preamble and file meta): what travels over the network."""
    if data[128:132] != b"DICM":
        return data
    off = 132
    while off + 8 <= len(data):
        (group,) = struct.unpack_from("<H", data, off)
        if group != 2:
            break
        vr = data[off + 4 : off + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", data, off + 8)
            off += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, off + 6)
            off += 8 + length
    return data[off:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------- films


@dataclass
class Fixture:
    """A DICOM file made by the tests and what the gate should decide about it."""

    path: Path
    uid: str
    expect: str  # accept | quarantine | any
    reason: str | None = None  # a reason that must be present
    absent: tuple[str, ...] = ()  # reasons that must not be present
    note: str = ""


def film_pixels(film_path: Path) -> np.ndarray:
    """A real film as 12-bit stored values (MONOCHROME2 sense)."""
    px = decode_file(film_path).pixels
    return np.round(px * 4095).astype(np.uint16)


def make_dicom(
    pixels: np.ndarray,
    path: Path,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    sop_class: str = DX_FOR_PRESENTATION,
    age: str | None = "045Y",
    study_uid: str | None = None,
    bits: int = 12,
) -> str:
    """Write a minimal valid image as explicit VR little endian; returns the SOP Instance UID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Film"
    ds.PatientID = "TEST-0001"
    if age:
        ds.PatientAge = age
    ds.StudyDate = "20240102"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.save_as(path, enforce_file_format=True)
    return uid


def dcmtk(tool: str, *args: str | Path) -> None:
    subprocess.run([tool, *map(str, args)], check=True, capture_output=True, env=DCMTK_ENV, timeout=60)


def normalise(src: Path, dst: Path) -> Path:
    """Re-write a file with DCMTK so storescu sends exactly its dataset bytes."""
    dcmtk("dcmconv", src, dst)
    return dst


def compress(src: Path, dst: Path, syntax: str) -> Path:
    if syntax == "jpeg-lossless":
        dcmtk("dcmcjpeg", "+e1", src, dst)  # JPEG lossless, first order prediction (SV1)
    elif syntax == "jpeg-ls":
        dcmtk("dcmcjpls", src, dst)
    elif syntax == "rle":
        dcmtk("dcmcrle", src, dst)
    elif syntax == "deflated":
        dcmtk("dcmconv", "+td", src, dst)
    elif syntax == "j2k":
        from pydicom.uid import JPEG2000Lossless

        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        tmp = dst.with_suffix(".pydicom.dcm")
        ds.save_as(tmp, enforce_file_format=True)
        normalise(tmp, dst)
        tmp.unlink()
    elif syntax in ("htj2k", "htj2k-lossy"):
        htj2k(src, dst, lossless=syntax == "htj2k")
    else:  # pragma: no cover
        raise ValueError(syntax)
    return dst


HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K = "1.2.840.10008.1.2.4.203"


def htj2k(src: Path, dst: Path, *, lossless: bool = True) -> Path:
    """Re-encode an uncompressed grey DICOM as High-Throughput JPEG 2000 with OpenJPH's ``ojph_compress`` (Debian
    openjph-tools; DCMTK 3.6.7 and the Python encoders here cannot write HTJ2K)."""
    import cv2
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(src)
    pgm, j2c = dst.with_suffix(".pgm"), dst.with_suffix(".j2c")
    cv2.imwrite(str(pgm), ds.pixel_array.astype(np.uint16))
    args = ["-reversible", "true"] if lossless else ["-reversible", "false", "-qstep", "0.001"]
    subprocess.run(["ojph_compress", "-i", pgm, "-o", j2c, *args], check=True, capture_output=True, timeout=60)
    ds.PixelData = encapsulate([j2c.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS if lossless else HTJ2K
    ds.save_as(dst, enforce_file_format=True)
    pgm.unlink()
    j2c.unlink()
    return dst


def transfer_syntax(path: Path) -> str:
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    return str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))


def storescu(files: Iterable[Path], port: int, *, aet: str = "TESTSCU", aec: str = "FILMGATE") -> list[str]:
    """Send files with DCMTK storescu (grouped by transfer syntax); returns storescu's error lines."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(STORESCU_TS_OPTION.get(transfer_syntax(f), ""), []).append(f)
    errors = []
    for option, group in groups.items():
        cmd = ["storescu", "-nh", "-aet", aet, "-aec", aec, *([option] if option else []), "127.0.0.1", str(port)]
        proc = subprocess.run([*cmd, *map(str, group)], capture_output=True, text=True, env=DCMTK_ENV, timeout=300)
        errors += [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    return errors


# ----------------------------------------------------------------------------------------------------- the node


_STARTED: list[Gate] = []


@pytest.fixture(autouse=True, scope="session")
def _reap_gates():
    """A failed test must not leave a node running."""
    yield
    for gate in _STARTED:
        if gate.proc is not None and gate.proc.poll() is None:
            gate.proc.kill()
            gate.proc.wait(10)


@dataclass
class Gate:
    """A `filmgate serve` subprocess with its own config, ports and folders."""

    root: Path
    dicom_port: int
    http_port: int
    config: dict
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "serve.log"
        self.config_path = self.root / "filmgate.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))

    @classmethod
    def create(
        cls,
        root: Path,
        accept_layout: str = "{SOPInstanceUID}.dcm",
        quarantine_layout: str = "{reasons}/{SOPInstanceUID}.dcm",
        dicom_port: int | None = None,
        **overrides: dict,
    ) -> Gate:
        root.mkdir(parents=True, exist_ok=True)
        dicom_port, http_port = dicom_port or free_port(), free_port()
        cfg = {
            "listener": {"ae_title": "FILMGATE", "host": "127.0.0.1", "port": dicom_port},
            "http": {"host": "127.0.0.1", "port": http_port},
            "spool": {"path": str(root / "spool")},
            "detectors": {"models_dir": str(MODELS)},
            "workers": {"drain_timeout": 20.0},
            "destinations": {
                "accept": {"type": "folder", "path": str(root / "accept"), "layout": accept_layout},
                "quarantine": {"type": "folder", "path": str(root / "quarantine"), "layout": quarantine_layout},
            },
            "routes": {"accept": ["accept"], "quarantine": ["quarantine"]},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "destinations":
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cls(root=root, dicom_port=dicom_port, http_port=http_port, config=cfg)

    def start(self, wait: bool = True) -> Gate:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "filmgate.cli", "serve", "--config", str(self.config_path)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _STARTED.append(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"filmgate serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.http_get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"filmgate serve not ready after {timeout} s:\n{self.log()}")

    @property
    def base_url(self) -> str:
        tls = self.config.get("http", {}).get("tls", {})
        return f"{'https' if tls.get('enabled') else 'http'}://127.0.0.1:{self.http_port}"

    def _tls_context(self):
        """HTTPS to the node: its own certificate is the trust anchor (no host name check: 127.0.0.1)."""
        tls = self.config.get("http", {}).get("tls", {})
        if not tls.get("enabled"):
            return None
        import ssl

        ctx = ssl.create_default_context(cafile=tls["cert_file"])
        ctx.check_hostname = False
        return ctx

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5, context=self._tls_context()) as rsp:
                return rsp.status, rsp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def api(self, path: str, *, user: str | None = None, password: str = "", method: str = "GET",
            body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:  # fmt: skip
        """One request to the node's HTTP port (the review API), with HTTP Basic when ``user`` is given; returns
        (status, body, headers). Never follows redirects."""
        import base64

        hdrs = dict(headers or {})
        if user is not None:
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if body is not None and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=body, headers=hdrs, method=method)
        opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=self._tls_context()))
        try:
            with opener.open(req, timeout=30) as rsp:
                return rsp.status, rsp.read(), dict(rsp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def api_json(self, path: str, user: str, password: str, **kw) -> dict:
        code, body, _ = self.api(path, user=user, password=password, **kw)
        assert code == 200, (code, body[:500])
        return json.loads(body)

    def metrics(self) -> dict[str, float]:
        code, text = self.http_get("/metrics")
        assert code == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sidecars(self) -> list[dict]:
        out = []
        for folder in ("accept", "quarantine"):
            for p in sorted((self.root / folder).rglob("*.json")):
                rec = json.loads(p.read_text())
                rec["_path"] = str(p.with_suffix(".dcm"))
                rec["_folder"] = folder
                out.append(rec)
        return out

    def wait_delivered(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.sidecars()
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise AssertionError(f"only {len(self.sidecars())} of {count} delivered:\n{self.log()[-4000:]}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib's signature
        return None


@pytest.fixture(scope="session")
def models_dir() -> Path:
    manifests = sorted(MODELS.glob("*/manifest.json"))
    names = {p.parent.name for p in manifests}
    assert {"orientation", "inversion"} <= names, f"shipped models missing under {MODELS}: found {sorted(names)}"
    return MODELS


@pytest.fixture(scope="session")
def val_films(data_dir) -> dict[str, list[Path]]:
    """Fixed val films (no randomness): adult frontal chests from two sources, and CT slices."""
    frontal = select(split="val", kind="frontal-chest")
    adult = [f for f in frontal if f.pediatric == "no" and f.source == "nih-cxr14"][:2]
    adult += [f for f in frontal if f.pediatric == "no" and f.source == "chexpert"][:2]
    ct = [f for f in select(split="val", kind="not-radiograph") if f.modality.upper() == "CT"]
    assert len(adult) >= 4 and ct
    return {"adult": [f.path for f in adult], "ct": [f.path for f in ct]}


@pytest.fixture(scope="session")
def made_films(tmp_path_factory, val_films) -> list[Fixture]:
    """DICOMs made from val films: normal, rotated, inverted, MONOCHROME1, compressed, pediatric, CT."""
    out_dir = tmp_path_factory.mktemp("films")
    fixtures: list[Fixture] = []

    def add(px: np.ndarray, name: str, expect: str, reason: str | None = None, absent: tuple[str, ...] = (),
            syntax: str | None = None, **kw) -> None:  # fmt: skip
        raw = out_dir / f"{name}.raw.dcm"
        uid = make_dicom(px, raw, **kw)
        final = out_dir / f"{name}.dcm"
        if syntax:
            compress(raw, final, syntax)
        else:
            normalise(raw, final)
        raw.unlink()
        fixtures.append(Fixture(final, uid, expect, reason, absent, name))

    for i, film in enumerate(val_films["adult"][::2]):  # one film of each source: nih-cxr14, chexpert
        px = film_pixels(film)
        add(px, f"normal-{i}", "accept", absent=("rotated", "inverted"))
        add(np.rot90(px, 1), f"rot90-{i}", "quarantine", "rotated")
        add(np.rot90(px, 2), f"rot180-{i}", "quarantine", "rotated")
        add(4095 - px, f"inverted-{i}", "quarantine", "inverted")
        add(4095 - px, f"mono1-{i}", "accept", absent=("inverted",), photometric="MONOCHROME1")
    px = film_pixels(val_films["adult"][1])
    for syntax in ("jpeg-lossless", "jpeg-ls", "j2k", "rle", "deflated"):
        add(px, f"normal-{syntax}", "accept", absent=("rotated", "inverted"), syntax=syntax)
    add(4095 - px, "mono1-j2k", "accept", absent=("inverted",), syntax="j2k", photometric="MONOCHROME1")
    add(np.rot90(px, 2), "rot180-rle", "quarantine", "rotated", syntax="rle")
    add(px, "pediatric-age", "quarantine", "pediatric", age="006Y")
    add(px, "cr-modality", "accept", absent=("modality",), modality="CR", sop_class=CR_STORAGE)
    ct = film_pixels(val_films["ct"][0])
    add(ct, "ct", "quarantine", "modality", modality="CT", sop_class=CT_STORAGE)
    return fixtures


# ----------------------------------------------------------------------------------------------------- pynetdicom


def send_file_raw(port: int, path: Path, *, aet: str = "RAWSCU", aec: str = "FILMGATE") -> int | None:
    """Send a file's dataset bytes exactly as they are (no decode) with pynetdicom; returns the status or None."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def write_with_meta(path: Path, payload: bytes, sop_class: str, uid: str, ts: str = ExplicitVRLittleEndian) -> Path:
    """A file with valid file meta followed by ``payload`` as its dataset (which may be garbage on purpose)."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ts
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(payload)
    return path


class Receiver:
    """A real receiving node (pynetdicom Storage SCP) that records what arrives, and can be stopped and restarted.

    ``syntaxes`` limits the transfer syntaxes it accepts (default: all the node's); ``answers`` maps an SOP Instance
    UID to the statuses to answer for it, one per attempt (then 0x0000); ``ssl_context`` serves TLS."""

    def __init__(self, port: int, ae_title: str = "PACS", *, syntaxes: list[str] | None = None,
                 answers: dict[str, list[int]] | None = None, ssl_context=None) -> None:  # fmt: skip
        self.port = port
        self.ae_title = ae_title
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, sha256 of the dataset bytes)
        self.datasets: dict[str, Dataset] = {}  # the last one received per SOP Instance UID
        self.syntax: dict[str, str] = {}  # and the transfer syntax it came in
        self.refused: list[tuple[str, int]] = []
        self.syntaxes = syntaxes
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.ssl_context = ssl_context
        self.server = None

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        pending = self.answers.get(uid)
        if pending:
            status = pending.pop(0)
            self.refused.append((uid, status))
            return status
        raw = event.encoded_dataset(include_meta=False)
        self.received.append((uid, sha(raw)))
        self.datasets[uid] = event.dataset
        self.syntax[uid] = str(event.context.transfer_syntax)
        return 0x0000

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from filmgate.listener import TRANSFER_SYNTAXES

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.syntaxes or TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )  # fmt: skip

    def stop(self) -> None:
        """Down for real: no listening socket and no association left open."""
        if self.server is not None:
            ae = self.server.ae
            self.server.shutdown()
            for assoc in list(ae.active_associations):
                assoc.abort()
            self.server = None

    def uids(self) -> list[str]:
        return [u for u, _ in self.received]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
