"""Helpers shared by every test area (imported from here, never from a conftest file).

- :func:`free_port`, :func:`wait_for`: loopback ports chosen by the OS; waiting for a condition with a deadline (the
  one way a test waits: no sleeps as synchronisation).
- :class:`ShippedDetector`: one shipped model judged by the gate's own judge (:mod:`filmgate.judge`), for the tests
  that check one detector's figures.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from filmgate.config import parse_config
from filmgate.decode import decode_file
from filmgate.detectors import DetectorSet, load_detector
from filmgate.judge import Judge
from filmgate.manifest import Finding, ModelManifest, load_manifest
from filmgate_training.datasets import LabelledFilm, select

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("FILMGATE_TEST_MODELS", REPO / "models"))  # the shipped detectors, unless told
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS chose it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.1,
    *,
    tolerate: bool = False,
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); an AssertionError naming ``what`` after
    ``timeout`` seconds (a callable ``what`` is asked then: a log tail at the time of the failure). With ``tolerate``
    an exception counts as "not yet" (a server refusing while it starts) and the last one is named in the failure."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            if not tolerate:
                raise
            last = exc
        if time.monotonic() >= deadline:
            why = f" (last error: {last!r})" if last else ""
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {text}{why}")
        time.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """:func:`wait_for` for servers that refuse while they start: an exception counts as "not yet"."""
    return wait_for(predicate, timeout, what, interval, tolerate=True)


class ShippedDetector:
    """One shipped model (``models/<name>``), judged as the gate judges: ``Judge.examine_pixels`` (the gate's
    preprocessing) then ``Judge.conclude`` (onnxruntime on CPU through the one session factory): the int8 model where
    the manifest names one, as the gate runs it on CPU; ``precision="fp32"`` the float model."""

    def __init__(self, name: str, models: Path = MODELS, threads: int = 2, precision: str = "auto") -> None:
        self.folder = models / name
        assert (self.folder / "manifest.json").is_file(), f"models/{name} is not shipped"
        self.manifest: ModelManifest = load_manifest(self.folder)  # schema + sha256, as the gate loads it
        cfg = parse_config({"detectors": {"models_dir": str(models), "provider": "cpu", "intra_op_threads": threads,
                                          "precision": precision}})  # fmt: skip
        self.judge = Judge(cfg, DetectorSet([load_detector(self.folder, self.manifest, cfg.detectors)]))

    def findings(self, images: Sequence[np.ndarray], batch: int = 64) -> list[Finding]:
        """This detector's finding on each decoded film (threshold: the manifest's)."""
        out: list[Finding] = []
        for i in range(0, len(images), batch):
            examined = [self.judge.examine_pixels(p) for p in images[i : i + batch]]
            out += [j.findings[0] for j in self.judge.conclude(examined)]
        return out

    def scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([f.score for f in self.findings(images)], dtype=np.float64)

    def flagged(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.manifest.flagged(self.scores(images))  # at least the threshold; under it for an age detector


# ---------------------------------------- the node: `filmgate serve`, films made from real ones, DCMTK, pynetdicom


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
    series_uid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a minimal valid image as explicit VR little endian; returns the SOP Instance UID. ``extra`` sets more
    attributes by keyword (e.g. the rest of an IOD's Type 1 and 2 attributes)."""
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
    ds.SeriesInstanceUID = series_uid or generate_uid()
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
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
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

def spool_drained(spool: Path) -> bool:
    """Nothing left in a node's spool (incoming/, claimed/, the DICOM outboxes): every acknowledged instance is at
    its destinations (an instance leaves the spool only once they all have it), so no further delivery can follow."""
    folders = [spool / d for d in ("incoming", "claimed", "outbox")]
    return not any(p.suffix == ".dcm" for d in folders if d.is_dir() for p in d.rglob("*"))


_STARTED: list[Gate] = []  # every node a test started (the service conftest kills what a failed test left running)


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

    def start(self, wait: bool = True, prefix: Iterable[str] = (), cwd: Path = REPO) -> Gate:
        """Run ``filmgate serve``; ``prefix`` wraps the command (e.g. ``unshare -m ...``, which must exec it, so that
        :attr:`proc` is the node itself)."""
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "filmgate.cli", "serve", "--config", str(self.config_path)],
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _STARTED.append(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"filmgate serve exited with {self.proc.returncode}:\n{self.log()}")
            return self.http_get("/readyz")[0] == 200

        wait_for(ready, timeout, lambda: f"filmgate serve to be ready:\n{self.log()}")

    def memory_kib(self) -> dict[str, int]:
        """The node process's VmRSS and VmHWM (peak resident set) in KiB."""
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def counter(self, name: str, **labels: str) -> float:
        """One sample of the node's /metrics (0 when absent)."""
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return self.metrics().get(key, 0.0)

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
        def enough() -> list[dict] | None:
            found = self.sidecars()
            return found if len(found) >= count else None

        def short() -> str:
            return f"{count} delivered (only {len(self.sidecars())}):\n{self.log()[-4000:]}"

        return wait_for(enough, timeout, short, interval=0.2)

    def wait_drained(self, timeout: float = 60.0) -> None:
        wait_for(lambda: spool_drained(self.root / "spool"), timeout,
                 lambda: f"the spool to drain:\n{self.log()[-4000:]}")  # fmt: skip

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib's signature
        return None

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
                 answers: dict[str, list[int]] | None = None, ssl_context=None,
                 keep_raw: bool = False) -> None:  # fmt: skip
        self.port = port
        self.ae_title = ae_title
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, sha256 of the dataset bytes)
        self.datasets: dict[str, Dataset] = {}  # the last one received per SOP Instance UID
        self.syntax: dict[str, str] = {}  # and the transfer syntax it came in
        self.keep_raw = keep_raw
        self.raw: list[tuple[str, bytes]] = []  # with keep_raw: (transfer syntax, dataset bytes) of each one stored
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
        if self.keep_raw:
            self.raw.append((self.syntax[uid], bytes(raw)))
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


# ---------------------------------------- operations: real Orthanc, Prometheus, `filmgate serve` and Docker


DEPLOY = REPO / "deploy"

VENV_BIN = Path(sys.executable).parent

INSTALL_HINT = "run deploy/ci-install.sh (it installs Debian prometheus and orthanc, and the PyPI linters)"

def tool(name: str) -> str:
    """Absolute path of an executable (the test venv first, then PATH); a missing tool fails the test."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found

def metrics_names_in_contract() -> set[str]:
    """Metric names of the table in docs/ARCHITECTURE.md (the contract), as exported (counters with _total)."""
    names = set()
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        if line.startswith("| `filmgate_"):
            names.add(line.split("`")[1])
    assert names, "no metric table found in docs/ARCHITECTURE.md"
    return names

def exported_series_names(contract: set[str]) -> set[str]:
    """The series names Prometheus stores for the contract's metrics (histograms as _bucket, _sum, _count)."""
    out = set()
    for name in contract:
        if name.endswith("_seconds"):
            out |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            out.add(name)
    return out

class Process:
    """A child process whose output goes to a log file that failures print."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode

def http(method: str, url: str, body: Any = None, auth: tuple[str, str] | None = None, timeout: float = 30.0):
    """One HTTP request; returns (status, bytes). JSON-encodes dict/list bodies."""
    data = None
    headers = {}
    if isinstance(body, dict | list):
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif body is not None:
        data = body
        headers["Content-Type"] = "application/dicom"
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()

class Orthanc:
    """A real Orthanc (Debian's package) started from one of deploy/orthanc/*.json with the test's ports and paths."""

    AUTH = ("demo", "demo")

    def __init__(self, config: dict, workdir: Path) -> None:
        self.config = config
        self.http_port = config["HttpPort"]
        self.dicom_port = config["DicomPort"]
        self.aet = config["DicomAet"]
        self.base = f"http://127.0.0.1:{self.http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.process = Process([tool("Orthanc"), str(path)], workdir / "orthanc.log", cwd=workdir)
        wait_for(self._up, 30, f"Orthanc {self.aet} on port {self.http_port}:\n{self.process.tail()}", tolerate=True)

    @classmethod
    def from_deploy(
        cls, name: str, workdir: Path, modalities: dict[str, dict], dicom_port: int | None = None
    ) -> Orthanc:
        """deploy/orthanc/<name>.json with loopback ports chosen here, storage in ``workdir``, the peers' addresses
        replaced by ``modalities`` (same AE titles as in the file), and every AE check of the file kept on."""
        config = json.loads((DEPLOY / "orthanc" / f"{name}.json").read_text())
        db = workdir / "db"
        config.update(
            StorageDirectory=str(db),
            IndexDirectory=str(db),
            HttpPort=free_port(),
            DicomPort=dicom_port or free_port(),
            RemoteAccessAllowed=False,  # loopback only
            DicomCheckModalityHost=True,  # the test knows the peers' addresses: check them too
        )
        for key, spec in modalities.items():
            assert key in config["DicomModalities"], f"deploy/orthanc/{name}.json has no modality {key!r}"
            config["DicomModalities"][key] = {**config["DicomModalities"][key], **spec}
        return cls(config, workdir)

    def _up(self) -> bool:
        assert self.process.alive(), f"Orthanc exited:\n{self.process.tail()}"
        status, _ = http("GET", self.base + "/system", auth=self.AUTH, timeout=2)
        return status == 200

    def get(self, path: str) -> Any:
        status, body = http("GET", self.base + path, auth=self.AUTH)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}"
        return json.loads(body)

    def get_bytes(self, path: str) -> bytes:
        status, body = http("GET", self.base + path, auth=self.AUTH)
        assert status == 200, f"GET {path}: {status}"
        return body

    def post(self, path: str, body: Any) -> Any:
        status, data = http("POST", self.base + path, body, auth=self.AUTH, timeout=120)
        assert status == 200, f"POST {path}: {status} {data[:500]!r}\n{self.process.tail(20)}"
        return json.loads(data) if data.strip() else None

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every instance stored (with repeats, if any)."""
        out = []
        for oid in self.get("/instances"):
            out.append(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return out

    def stop(self) -> None:
        self.process.stop()

class Prometheus:
    """A real Prometheus (Debian's package) scraping ``target`` every second, with the deploy rule files loaded."""

    def __init__(self, target: str, workdir: Path) -> None:
        import yaml

        base = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        job = next(j for j in base["scrape_configs"] if j["job_name"] == "filmgate")
        job["static_configs"] = [{"targets": [target], "labels": job["static_configs"][0].get("labels", {})}]
        job["scrape_interval"] = "1s"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))],
            "scrape_configs": [job],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = Process(
            [
                tool("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            workdir / "prometheus.log",
            cwd=workdir,
        )
        wait_for(self._up, 30, f"Prometheus on port {self.port}:\n{self.process.tail()}", tolerate=True)

    def _up(self) -> bool:
        assert self.process.alive(), f"prometheus exited:\n{self.process.tail()}"
        status, _ = http("GET", self.base + "/-/ready", timeout=2)
        return status == 200

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http("GET", url)
        doc = json.loads(body)
        assert status == 200 and doc.get("status") == "success", f"{path} {params}: {status} {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_scraping(self, timeout: float = 30.0) -> None:
        """Until the node has been scraped (discovery hands targets over only every 5 s after start)."""

        def up() -> bool:
            rows = self.query('up{job="filmgate"}')
            return bool(rows) and rows[0]["value"][1] == "1"

        wait_for(up, timeout, f"Prometheus to scrape filmgate:\n{self.process.tail()}", interval=0.5, tolerate=True)

    def stop(self) -> None:
        self.process.stop()

class FilmgateNode:
    """`filmgate serve --config FILE` as a subprocess, ready when /readyz answers 200."""

    def __init__(self, config: dict, workdir: Path, timeout: float = 90.0) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "filmgate.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.http_port = config["http"]["port"]
        self.dicom_port = config["listener"]["port"]
        env = {k: v for k, v in os.environ.items() if k != "FILMGATE_CONFIG"}
        self.process = Process(
            [tool("filmgate"), "serve", "--config", str(self.config_path)], workdir / "filmgate.log", env=env
        )
        what = f"filmgate /readyz on port {self.http_port}:\n{self.process.tail()}"
        wait_for(self._ready, timeout, what, tolerate=True)

    def _ready(self) -> bool:
        assert self.process.alive(), f"filmgate serve exited:\n{self.process.tail()}"
        status, _ = http("GET", f"http://127.0.0.1:{self.http_port}/readyz", timeout=2)
        return status == 200

    def metrics(self) -> str:
        status, body = http("GET", f"http://127.0.0.1:{self.http_port}/metrics")
        assert status == 200
        return body.decode()

    def stop(self) -> int | None:
        return self.process.stop(60)

def docker_cli() -> str:
    """Debian's docker.io client (speaks BuildKit without the buildx plugin) when installed, else the one on PATH."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else (shutil.which("docker") or "docker")

def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-2000:]}",
                    pytrace=False)  # fmt: skip
    return res


# ---------------------------------------- the detectors: fixed val subsets, decoded films


DETECTORS = ("flip", "view", "pediatric", "atypical")

# How far int8 score statistics may move between CPUs. onnxruntime picks its int8 kernels by instruction set (AVX2's
# pmaddubsw adds pairs of u8*s8 products in saturating 16 bits, AVX-512 VNNI's vpdpbusd in 32), so the same int8 file
# gives scores a few 1e-4 apart on an AMD EPYC with AVX2 only and on a VNNI machine (measured: max score difference
# 0.00120 against 0.00115, p99 0.00069 against 0.00046). Counts and verdicts must still agree exactly.
PARITY_SCORE_TOLERANCE = 2e-3
_PARITY_SCORE_KEYS = {"max_score_diff", "p99_score_diff", "mean_score_diff", "mean_score_shift", "closest_to_threshold"}


def assert_same_parity(made: Mapping[str, Any], shipped: Mapping[str, Any]) -> None:
    """A rebuilt int8 model's parity figures against the shipped ones: every count, verdict and setting equal, the
    score statistics within :data:`PARITY_SCORE_TOLERANCE` (they depend on the CPU that measured them)."""
    assert set(made) == set(shipped)
    exact = {k: v for k, v in made.items() if k not in _PARITY_SCORE_KEYS}
    assert exact == {k: v for k, v in shipped.items() if k not in _PARITY_SCORE_KEYS}
    for key in _PARITY_SCORE_KEYS & set(made):
        assert made[key] == pytest.approx(shipped[key], abs=PARITY_SCORE_TOLERANCE), key


def val_subset(kind: str, per_source: int, sources: tuple[str, ...] | None = None) -> list[LabelledFilm]:
    """A fixed subset of ``val`` films of one kind: every k-th film of each source, in path order (no randomness)."""
    by_source: dict[str, list[LabelledFilm]] = defaultdict(list)
    for film in select(split="val", kind=kind):
        if sources is None or film.source in sources:
            by_source[film.source].append(film)
    out = []
    for _, films in sorted(by_source.items()):
        films.sort(key=lambda f: str(f.path))
        step = max(1, len(films) // per_source)
        out.extend(films[::step][:per_source])
    return out

_PIXELS: dict[Path, np.ndarray] = {}

def pixels(film: LabelledFilm | Path) -> np.ndarray:
    """Decoded film (memoised for the test session: several tests look at the same films)."""
    path = film if isinstance(film, Path) else film.path
    if path not in _PIXELS:
        _PIXELS[path] = decode_file(path).pixels
    return _PIXELS[path]


# ---------------------------------------- the sweep: the installed `filmgate sweep` and its outputs


FILMGATE = str(Path(sys.executable).parent / "filmgate")

SKIPPED = {"notes/readme.txt", "notes/empty.dat", "archive/DICOMDIR"}

def run_sweep(*args: str | Path, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``filmgate sweep ARGS`` from an empty folder, as a user runs it (no progress bar: not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "FILMGATE_CONFIG"}
    proc = subprocess.run([FILMGATE, "sweep", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")  # fmt: skip
    if check:
        assert proc.returncode == 0, f"filmgate sweep {args}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc

def committed_rows(out: Path) -> int:
    """Results a running ``filmgate sweep --out OUT`` has committed so far (read beside it: its state is WAL SQLite)."""
    import sqlite3

    try:
        with sqlite3.connect(out / "sweep.sqlite", timeout=5) as db:
            return db.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # not created yet


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))

def inspect(files: list[Path]) -> dict[str, dict]:
    """``filmgate inspect`` on ``files`` (one process): file -> its JSON line."""
    proc = subprocess.run([FILMGATE, "inspect", *map(str, files)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {d["file"]: d for d in map(json.loads, proc.stdout.splitlines())}


def make_pki(folder: Path, name: str = "ca") -> dict[str, Path]:
    """A test CA made with openssl, and a server certificate (CN localhost) and a client certificate it signed:
    ``{"ca", "server.crt", "server.key", "client.crt", "client.key"}`` (PEM files under ``folder``)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    ca, ca_key = folder / f"{name}.crt", folder / f"{name}.key"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=filmgate test {name}",
        "-keyout", ca_key, "-out", ca)  # fmt: skip
    out = {"ca": ca}
    for who, cn in (("server", "localhost"), ("client", "sender")):
        key, csr, crt = folder / f"{who}.key", folder / f"{who}.csr", folder / f"{who}.crt"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", key, "-out", csr)
        run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2", "-out", crt)
        out[f"{who}.crt"], out[f"{who}.key"] = crt, key
    return out
