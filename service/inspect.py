"""``filmgate inspect``: the gate's judgement on files, one JSON line per file.

Researchers use it to check a film and we use it to evaluate, so it is exactly the serving path: it calls the one
judge (:mod:`filmgate.judge`) that the node calls. A plain image (PNG/JPEG) has no DICOM header, so only the image
detectors apply (no modality or age rules).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from filmgate.config import Config
from filmgate.judge import Judge


def inspect_files(cfg: Config, files: Sequence[Path], out: TextIO, *, metadata_only: bool = False) -> int:
    """Judge each file; exit status 2 when no detector loads, unless only the metadata rules were asked for (a
    sweep that silently accepts everything is worse than one that stops)."""
    try:
        judge = Judge.load(cfg, metadata_only=metadata_only)
    except RuntimeError as exc:
        print(f"filmgate inspect: {exc}; or pass --metadata-only", file=sys.stderr)
        return 2
    if not judge.detectors.detectors:
        print("filmgate inspect: no detectors loaded; metadata rules only", file=sys.stderr)
    for path in files:
        print(json.dumps({"file": str(path), **judge.judge(path).to_dict()}), file=out, flush=True)
    return 0
