"""The one judge (filmgate.judge): the rules every caller (node, inspect, gate report, sweep) gets from it."""

from __future__ import annotations

import numpy as np

from filmgate.config import parse_config
from filmgate.judge import FIELD_KEYS, Judge


def _judge(models_dir) -> Judge:
    return Judge.load(parse_config({"detectors": {"models_dir": str(models_dir), "provider": "cpu"}}))


def test_a_detector_failure_is_detector_error_not_undecodable(made_films, models_dir):
    """onnxruntime refusing a batch (here: a tensor of the wrong shape) quarantines the batch's films as
    `detector-error` with the error as a note, instead of raising or calling the films undecodable."""
    judge = _judge(models_dir)
    films = [f for f in made_films if f.note in ("normal-0", "rot90-0")]
    examined = [judge.examine(f.path) for f in films]
    assert all(ex.inputs for ex in examined)
    spec = next(iter(examined[0].inputs))
    examined[0].inputs[spec] = np.zeros((1, 7, 7), np.float32)  # the model's input is (1, size, size)
    judgements = judge.conclude(examined)
    for j in judgements:
        assert j.decision.reasons == ("detector-error",), j.decision.reasons
        assert j.decision.notes["error"].startswith("detectors failed:") and j.error == j.decision.notes["error"]
        assert j.fields["SOPInstanceUID"]  # the header was read: the film itself is fine
    again = judge.judge(films[1].path)  # the next batch is judged normally
    assert "rotated" in again.decision.reasons and again.error is None


def test_an_unreadable_header_is_a_film_without_a_header(models_dir, tmp_path):
    """One rule for the node and inspect: no header rules (no `modality`) on a film whose header cannot be read, and
    every field present (empty)."""
    judge = _judge(models_dir)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xff\xff")  # file meta cut short
    for j in (judge.judge(junk), judge.judge(junk.read_bytes(), suffix=".dcm")):
        assert j.decision.reasons == ("undecodable",)
        assert not j.metadata.is_dicom and j.error
        assert j.fields == dict.fromkeys(FIELD_KEYS, "")
    failed = judge.conclude([Judge.failed("internal error: boom")])[0]
    assert failed.decision.reasons == ("undecodable",) and failed.decision.notes["error"] == "internal error: boom"
