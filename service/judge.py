"""The one judge: a film in, its metadata, findings and decision out.

Every consumer of the gate's verdict calls this module: the node's pipeline, ``filmgate inspect``, the sweep, the
gate report, site calibration and the review console's re-judging. Judging is split in two steps so that the node can
decode in several threads and batch inference in one:

* :meth:`Judge.examine` reads and decodes one film (DICOM bytes or file, PNG, JPEG) and prepares its detector inputs;
  it never raises for a bad film: the error is kept and becomes the ``undecodable`` reason.
* :meth:`Judge.conclude` runs the detectors over a batch of examined films and applies the pure
  :func:`filmgate.policy.decide`. It never raises for a detector failure either: every film of the failed batch gets
  the ``detector-error`` reason (the film may be fine; it is not called ``undecodable``).

A film whose DICOM header cannot be read is judged as a film *without a header* (``Metadata(is_dicom=False)``): only
``undecodable`` applies, no header rule (``modality``, the age) can be checked, and ``fields``/``header`` hold empty
strings. The node, ``inspect`` and the sweep all follow this one rule. ``fields`` always has the same keys
(:data:`FIELD_KEYS`), empty where the film does not say.

:meth:`Judge.judge` and :meth:`Judge.judge_many` do both for callers that need no pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from filmgate.config import Config, LimitsConfig
from filmgate.dataset_io import file_size
from filmgate.decode import (
    DICOM_SUFFIXES,
    DecodeError,
    decode_bytes,
    decode_dataset,
    is_dicom,
    is_dicom_file,
    read_dataset,
)
from filmgate.detectors import DetectorSet
from filmgate.manifest import Finding
from filmgate.policy import Decision, Metadata, decide

log = logging.getLogger("filmgate.judge")


@dataclass
class Examined:
    """A film decoded and prepared, waiting for the detectors (mutable while it travels between stages)."""

    metadata: Metadata
    fields: dict[str, str] = field(default_factory=dict)  # StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, ...
    header: dict[str, str] = field(default_factory=dict)  # Modality, ViewPosition, BodyPartExamined, PatientAge
    transfer_syntax: str = ""
    pixels: np.ndarray | None = None  # grey [0, 1] as decoded (before each detector's own preprocessing)
    inputs: dict[Any, np.ndarray] | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    source_ae: str = ""  # the file meta's Source Application Entity Title, where the film carries one
    detector_error: str | None = None  # set by conclude() when the detectors failed on the film's batch


@dataclass(frozen=True)
class Judgement:
    """What the gate concluded about one film."""

    metadata: Metadata
    findings: tuple[Finding, ...]
    decision: Decision
    fields: dict[str, str]
    header: dict[str, str]
    transfer_syntax: str
    pixels: np.ndarray | None
    error: str | None
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """The JSON line ``filmgate inspect`` prints (decision, reasons, scores, predicted classes, error)."""
        d = self.decision
        out: dict[str, Any] = {
            "decision": d.outcome,
            "reasons": list(d.reasons),
            "scores": {k: round(v, 6) for k, v in d.scores.items()},
        }
        predicted = {f.detector: f.predicted for f in d.findings if f.predicted is not None}
        if predicted:
            out["predicted"] = predicted
        if self.error:
            out["error"] = self.error
        return out


HEADER_KEYS = ("Modality", "ViewPosition", "BodyPartExamined", "PatientAge")
DICOM_NAMES = (*DICOM_SUFFIXES, ".dic")  # a suffix that makes a file DICOM without its DICM magic
FIELD_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")


class Decoder(Protocol):
    """Where :meth:`Judge.examine` decodes when not in its own thread (the node's supervised child process)."""

    def decode(self, source: Path | bytes, *, suffix: str | None = None) -> Examined: ...
    def close(self) -> None: ...


def decode_film(source: Path | bytes, *, suffix: str | None = None, limits: LimitsConfig | None = None) -> Examined:
    """Read and decode one film within ``limits``, without the detectors' inputs; never raises for a bad film (the
    error is kept and becomes ``undecodable``). This is the part of judging that hostile input can crash, so the node
    runs it in a supervised child process."""
    limits = limits or LimitsConfig()
    t0 = time.perf_counter()
    data: Path | bytes = source
    if isinstance(source, Path):
        suffix = (source.suffix if suffix is None else suffix).lower()
        try:
            size = file_size(source)
            if size > limits.max_dataset_bytes:
                return failed(f"the file is larger than limits.max_dataset_bytes ({size} > {limits.max_dataset_bytes} "
                              "bytes)")  # fmt: skip
            # A DICOM file is read by read_dataset from the file itself (one copy of its pixel data); anything
            # else is read whole for the image decoders.
            dicom = is_dicom_file(source, suffix, DICOM_NAMES)
            if not dicom:
                data = source.read_bytes()
        except OSError as exc:
            return failed(f"cannot read the file: {exc.strerror}")
        except DecodeError as exc:
            return failed(str(exc))
    else:
        suffix = (suffix or "").lower()
        dicom = is_dicom(source, suffix, DICOM_NAMES)
    # Until a header is read the film has none: no header rules apply, and the fields stay empty.
    ex = Examined(metadata=Metadata(is_dicom=False), fields=dict.fromkeys(FIELD_KEYS, ""))
    try:
        if dicom:
            ds = read_dataset(data, max_bytes=limits.max_dataset_bytes)
            del data
            meta = getattr(ds, "file_meta", None)
            ts = meta.get("TransferSyntaxUID") if meta is not None else None
            ex.transfer_syntax = str(ts or "")
            ex.source_ae = _text(meta, "SourceApplicationEntityTitle") if meta is not None else ""
            ex.fields = _fields(ds)
            ex.header = {k: _text(ds, k) for k in HEADER_KEYS}
            ex.metadata = Metadata.from_dataset(ds)
            try:
                ex.pixels = decode_dataset(ds, max_pixels=limits.max_pixels).pixels
            except DecodeError as exc:
                ex.error = str(exc)
            except Exception as exc:  # a decoder failing on hostile input is still just undecodable
                ex.error = f"{type(exc).__name__}: {exc}"
            finally:
                del ds
        else:
            raw = data if isinstance(data, bytes) else data.read_bytes()  # always bytes here: read above
            ex.pixels = decode_bytes(raw, suffix=suffix).pixels
    except DecodeError as exc:
        ex.error = str(exc)
    except BaseException as exc:  # MemoryError, a decoder's panic (pyo3 PanicException is a BaseException): a bad film
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        ex.error = f"{type(exc).__name__}: {exc}"
    ex.timings["decode"] = time.perf_counter() - t0
    return _failed(ex) if ex.error else ex


def failed(error: str) -> Examined:
    """An examined film that could not be looked at (unreadable, beyond a limit, its decode process died): it is
    concluded ``undecodable`` with ``error`` as its note."""
    return _failed(Examined(metadata=Metadata(is_dicom=False), fields=dict.fromkeys(FIELD_KEYS, ""), error=error))


def _failed(ex: Examined) -> Examined:
    ex.metadata = Metadata(**{**ex.metadata.__dict__, "decode_error": ex.error})
    ex.pixels = None
    ex.inputs = None
    return ex


class Judge:
    """The gate's decode, detectors and policy, bound to one configuration."""

    def __init__(self, cfg: Config, detectors: DetectorSet, decoder: Decoder | None = None) -> None:
        self.cfg = cfg
        self.detectors = detectors
        self.decoder = decoder

    @classmethod
    def load(cls, cfg: Config, *, metadata_only: bool = False, decoder: Decoder | None = None) -> Judge:
        """Load the configured detectors (an error when none loads and ``detectors.require``, unless
        ``metadata_only``)."""
        require = cfg.detectors.require and not metadata_only
        dets = DetectorSet([]) if metadata_only else DetectorSet.load(cfg.detectors, require=require)
        return cls(cfg, dets, decoder)

    # ------------------------------------------------------------------ step 1: decode and prepare

    def examine(self, source: Path | bytes, *, suffix: str | None = None) -> Examined:
        """Decode one film and prepare its detector inputs. ``source`` is a file or its bytes; ``suffix`` (".png",
        ".dcm", ...) tells plain images from DICOM when the bytes do not (DICOM without a preamble). The decode runs
        in ``decoder`` when one is given (the node's supervised decode child, :mod:`filmgate.sandbox`)."""
        if self.decoder is not None:
            ex = self.decoder.decode(source, suffix=suffix)
        else:
            ex = decode_film(source, suffix=suffix, limits=self.cfg.limits)
        if ex.pixels is not None and ex.error is None and self.detectors.detectors:
            t1 = time.perf_counter()
            ex.inputs = self.detectors.prepare(ex.pixels)
            ex.timings["preprocess"] = time.perf_counter() - t1
        return ex

    def examine_pixels(self, pixels: np.ndarray, metadata: Metadata | None = None) -> Examined:
        """A film already decoded (grey [0, 1], as :meth:`examine` decodes), prepared for the detectors: for films
        made in memory (the gate report's made-wrong films, tests of one detector). Without ``metadata`` it has no
        header, like a PNG."""
        ex = Examined(metadata=metadata or Metadata(is_dicom=False), fields=dict.fromkeys(FIELD_KEYS, ""))
        ex.pixels = np.ascontiguousarray(pixels)
        if self.detectors.detectors:
            t0 = time.perf_counter()
            ex.inputs = self.detectors.prepare(ex.pixels)
            ex.timings["preprocess"] = time.perf_counter() - t0
        return ex

    @staticmethod
    def failed(error: str) -> Examined:
        """An examined film that could not be looked at, for a caller whose own step failed (a decode process that
        died, an internal error): it is concluded ``undecodable`` with ``error`` as its note."""
        return failed(error)

    # ------------------------------------------------------------------ step 2: detectors and policy

    def conclude(self, batch: Sequence[Examined]) -> list[Judgement]:
        """Run the detectors over every prepared film of ``batch`` at once, then decide each. A detector run that
        raises gives every film of the batch the ``detector-error`` reason (logged once with its traceback)."""
        ready = [ex for ex in batch if ex.inputs is not None]
        findings: dict[int, list[Finding]] = {}
        failed: str | None = None
        if ready:
            t0 = time.perf_counter()
            try:
                results = self.detectors.run([ex.inputs for ex in ready])  # type: ignore[misc]
            except Exception as exc:  # onnxruntime (or a model) failed: the films may be fine
                log.exception("the detectors failed on a batch of %d film(s)", len(ready))
                failed = f"detectors failed: {type(exc).__name__}: {exc}"
                results = [[] for _ in ready]
            per = (time.perf_counter() - t0) / len(ready)
            for ex, found in zip(ready, results, strict=True):
                findings[id(ex)] = found
                ex.inputs = None
                ex.timings["inference"] = per
                ex.timings["batch"] = len(ready)
                if failed:
                    ex.detector_error = failed
        out = []
        for ex in batch:
            found = findings.get(id(ex), [])
            decision = decide(found, ex.metadata, self.cfg.policy, detector_error=ex.detector_error)
            out.append(
                Judgement(
                    metadata=ex.metadata, findings=tuple(found), decision=decision, fields=ex.fields,
                    header=ex.header, transfer_syntax=ex.transfer_syntax, pixels=ex.pixels,
                    error=ex.error or ex.detector_error, timings=ex.timings,
                )  # fmt: skip
            )
        return out

    # ------------------------------------------------------------------ both

    def judge(self, source: Path | bytes, *, suffix: str | None = None) -> Judgement:
        return self.conclude([self.examine(source, suffix=suffix)])[0]

    def judge_many(self, sources: Iterable[Path], *, batch: int = 8) -> Iterable[tuple[Path, Judgement]]:
        """Judge files in batches of ``batch`` (in order); memory stays bounded by one batch."""
        pending: list[tuple[Path, Examined]] = []
        for path in sources:
            pending.append((path, self.examine(path)))
            if len(pending) >= batch:
                yield from zip([p for p, _ in pending], self.conclude([e for _, e in pending]), strict=True)
                pending = []
        if pending:
            yield from zip([p for p, _ in pending], self.conclude([e for _, e in pending]), strict=True)


def _text(ds: Any, name: str) -> str:
    try:
        value = ds.get(name)
    except Exception:
        return ""
    return str(value).strip() if value not in (None, "") else ""


def _fields(ds: Any) -> dict[str, str]:
    meta = getattr(ds, "file_meta", None)

    def from_meta(name: str) -> str:
        try:
            return str(meta.get(name, "") or "") if meta is not None else ""
        except Exception:
            return ""

    return {
        "StudyInstanceUID": _text(ds, "StudyInstanceUID"),
        "SeriesInstanceUID": _text(ds, "SeriesInstanceUID"),
        "SOPInstanceUID": _text(ds, "SOPInstanceUID") or from_meta("MediaStorageSOPInstanceUID"),
        "SOPClassUID": _text(ds, "SOPClassUID") or from_meta("MediaStorageSOPClassUID"),
        "Modality": _text(ds, "Modality"),
    }
