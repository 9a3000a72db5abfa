"""``filmgate inspect``: the gate's decode, detectors and policy on files, one JSON line per file.

Researchers use it to check a film and we use it to evaluate, so it must be exactly the serving path: same decode,
same preprocessing, same detectors, same :func:`filmgate.policy.decide`. A plain image (PNG/JPEG) has no DICOM header,
so only the image detectors apply (no modality or age rules).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from filmgate.config import Config
from filmgate.decode import DecodeError, decode_bytes, decode_dataset, is_dicom_bytes, read_dataset
from filmgate.detectors import DetectorSet
from filmgate.policy import Metadata, decide


def inspect_one(path: Path, detectors: DetectorSet, cfg: Config) -> dict:
    findings = []
    error = None
    metadata: Metadata | None = None
    try:
        data = path.read_bytes()
    except OSError as exc:
        data, error = b"", f"cannot read the file: {exc.strerror}"
    pixels = None
    if error is None:
        dicom = is_dicom_bytes(data[:132]) or path.suffix.lower() in (".dcm", ".dicom")
        try:
            if dicom:
                ds = read_dataset(data)
                metadata = Metadata.from_dataset(ds)
                pixels = decode_dataset(ds).pixels
            else:
                pixels = decode_bytes(data, suffix=path.suffix.lower()).pixels
        except DecodeError as exc:
            error = str(exc)
    if pixels is not None:
        findings = detectors.run([detectors.prepare(pixels)])[0]
    if error is not None:
        base = metadata or Metadata(is_dicom=False)
        metadata = Metadata(**{**base.__dict__, "decode_error": error})
    decision = decide(findings, metadata, cfg.policy)
    out = {
        "file": str(path),
        "decision": decision.outcome,
        "reasons": list(decision.reasons),
        "scores": {k: round(v, 6) for k, v in decision.scores.items()},
    }
    predicted = {f.detector: f.predicted for f in decision.findings if f.predicted is not None}
    if predicted:
        out["predicted"] = predicted
    if error:
        out["error"] = error
    return out


def inspect_files(cfg: Config, files: Sequence[Path], out: TextIO, *, metadata_only: bool = False) -> int:
    """Judge each file; exit status 2 when no detector loads, unless only the metadata rules were asked for (a
    sweep that silently accepts everything is worse than one that stops)."""
    try:
        detectors = DetectorSet.load(cfg.detectors, require=cfg.detectors.require and not metadata_only)
    except RuntimeError as exc:
        print(f"filmgate inspect: {exc}; or pass --metadata-only", file=sys.stderr)
        return 2
    if not detectors.detectors:
        print("filmgate inspect: no detectors loaded; metadata rules only", file=sys.stderr)
    for path in files:
        print(json.dumps(inspect_one(path, detectors, cfg)), file=out, flush=True)
    return 0
