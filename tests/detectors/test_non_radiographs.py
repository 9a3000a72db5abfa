"""Non-radiographs are kept out by the whole gate (issue 10: at least 99.5%), and CT/MR reformats that look like a
film go to quarantine (docs/ARCHITECTURE.md, "What a radiograph is").

Real films, the shipped detectors, the gate's one judge and default policy: a fixed subset of the ``not-radiograph``
films of labels.csv (every second one in path order, both splits, with every radiograph-like CT image the full report
names) and the real CT/NM DICOM files, as stored and as pixels without a header. The full figures, on every film, are
made by ``python -m filmgate_training.detectors.non_radiographs`` (training/reports/non-radiographs.md).
"""

from __future__ import annotations

import math

import pytest

from filmgate.config import parse_config
from filmgate.decode import decode_file
from filmgate.judge import Judge
from filmgate_training.detectors.non_radiographs import GOAL, films, look_alike
from tests.helpers import CT_STORAGE, MODELS, film_pixels, make_dicom

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load(parse_config({"detectors": {"models_dir": str(MODELS), "provider": "cpu",
                                                  "intra_op_threads": 1}}))  # fmt: skip


def subset():
    plain, dicom = films()
    chosen = [f for i, f in enumerate(plain) if i % 2 == 0 or look_alike(f)]
    return chosen, dicom


def test_the_gate_keeps_out_non_radiographs_within_the_goal(judge):
    plain, dicom = subset()
    assert len(plain) >= 200 and {f.source for f in plain} >= {"ct-msk", "vqa-rad", "radiopaedia-trauma"}
    judged = [(f.rel, j) for f, (_, j) in zip(plain, judge.judge_many([f.path for f in plain], batch=32),
                                              strict=True)]  # fmt: skip
    judged += [(f"{f.rel} (as stored)", j) for f, (_, j) in zip(dicom, judge.judge_many([f.path for f in dicom]),
                                                                 strict=True)]  # fmt: skip
    bare = judge.conclude([judge.examine_pixels(decode_file(f.path).pixels) for f in dicom])
    judged += [(f"{f.rel} (pixels only)", j) for f, j in zip(dicom, bare, strict=True)]
    accepted = [name for name, j in judged if j.decision.accepted]
    allowed = math.floor((1 - GOAL) * len(judged) + 1e-9)
    assert len(accepted) <= allowed, f"{len(accepted)} of {len(judged)} non-radiographs accepted: {accepted}"
    stored = [j for name, j in judged if name.endswith("(as stored)")]
    assert stored and all(j.decision.reasons[0] == "modality" for j in stored)  # the header decides a CT or NM file


def test_ct_and_mr_reformats_that_look_like_a_film_are_quarantined_by_their_header(judge, tmp_path):
    """The policy: a CT or MR image is not a radiograph, however film-like (coronal reformats, a rendering, a
    localiser): sent as DICOM, each is quarantined by the modality rule before any detector speaks."""
    plain, dicom = films()
    alike = [f for f in plain if look_alike(f)]
    assert len(alike) >= 40 and any("chest" in (look_alike(f) or "") for f in alike)
    files = []
    for i, film in enumerate(alike[::4] + [f for f in alike if "chest" in (look_alike(f) or "")]):
        modality, sop = ("MR", MR_STORAGE) if i % 2 else ("CT", CT_STORAGE)
        path = tmp_path / f"{i}.dcm"
        make_dicom(film_pixels(film.path), path, modality=modality, sop_class=sop)
        files.append(path)
    files += [f.path for f in dicom if look_alike(f)]  # the real CT localiser
    decisions = [j.decision for _, j in judge.judge_many(files)]
    assert len(decisions) >= 12
    assert all(not d.accepted and d.reasons[0] == "modality" for d in decisions), [d.reasons for d in decisions]
