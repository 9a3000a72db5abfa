"""The shipped issue-4 detectors reach their goals on val films, run as the gate runs them.

Decoding every val film takes seconds (most are 224 px), so the goals are checked on the whole val split rather than a
sample: the figures here are the same as in each model's evaluation report, at the threshold in its manifest. Each
assertion is the issue's goal; the allowed count is the goal rate times the number of films, rounded down.
"""

from __future__ import annotations

import math
from functools import cache

import cv2
import numpy as np
import pytest

from filmgate_training.datasets import LabelledFilm, select
from tests.helpers import pixels


def wrong_rows() -> set[str]:
    """Val films whose row is wrong for these checks (the NIH film stored upside down): the shipped flip model's
    ``data.exclude``, as its evaluation left them out."""
    from filmgate.manifest import load_manifest
    from tests.helpers import MODELS

    return {e["path"] for e in load_manifest(MODELS / "flip").extra["config"]["data"]["exclude"]}


def allowed(rate: float, n: int) -> int:
    return math.floor(rate * n + 1e-9)


@cache
def val(kind: str) -> tuple[LabelledFilm, ...]:
    return tuple(sorted(select(split="val", kind=kind), key=lambda f: str(f.path)))


def images(films) -> list[np.ndarray]:
    return [pixels(f) for f in films]


def small_jpeg_copy(px: np.ndarray, side: int = 224) -> np.ndarray:
    """What the pediatric ``kermany`` copy is: a 224 px square, 8-bit JPEG."""
    small = (cv2.resize(px, (side, side), interpolation=cv2.INTER_AREA) * 255).astype(np.uint8)
    return cv2.imdecode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], 0).astype(np.float32) / 255


@pytest.fixture(scope="module")
def frontal():
    films = val("frontal-chest")
    assert len(films) > 1000
    return films


def test_view_keeps_out_laterals_other_radiographs_and_non_radiographs(detector, frontal):
    view = detector("view")
    others = val("lateral-chest") + val("other-radiograph") + val("not-radiograph")
    hit = view.flagged(images(others))
    missed = [f"{f.kind}:{f.rel}" for f, h in zip(others, hit, strict=True) if not h]
    assert len(missed) <= allowed(0.01, len(others)), f"not kept out: {missed}"
    laterals = [h for f, h in zip(others, hit, strict=True) if f.kind == "lateral-chest"]
    assert len(laterals) >= 10 and all(laterals), "every real val lateral film must be kept out"
    wrongly = [f.rel for f, h in zip(frontal, view.flagged(images(frontal)), strict=True) if h]
    assert len(wrongly) <= allowed(0.005, len(frontal)), f"frontal films flagged: {wrongly}"
    # The pooled rate is mostly children's films (one hospital); the goal must hold for adult films on their own too.
    adults = [f for f in frontal if f.pediatric != "yes" and f.rel not in wrong_rows()]
    adults_flagged = [r for r in wrongly if r in {f.rel for f in adults}]
    assert len(adults_flagged) <= allowed(0.005, len(adults)), f"adult frontal films flagged: {adults_flagged}"


def test_view_names_the_kind(detector):
    """The predicted label (written to the sidecar) is the film's kind for nearly every non-frontal film."""
    view = detector("view")
    films = val("lateral-chest") + val("other-radiograph") + val("not-radiograph")
    found = view.findings(images(films))
    right = sum(fd.predicted == f.kind for f, fd in zip(films, found, strict=True))
    assert right >= 0.95 * len(films)
    assert all(fd.predicted == "lateral-chest" for f, fd in zip(films, found, strict=True) if f.kind == "lateral-chest")


# The goal is 98% (pooled, reported per source). vqa-rad stays under 98% (see models/flip/MODEL_CARD.md: a
# situs inversus film, one of 21); there the test guards the shipped figure against regressions.
FLIP_KNOWN_SHORT = {"vqa-rad": 0.95}


def test_flip_pooled_and_per_source(detector, frontal):
    flip = detector("flip")
    films = [f for f in frontal if f.rel not in wrong_rows()]  # turned 180 degrees: left out as for orientation
    ims = images(films)
    unaltered = flip.flagged(ims)
    mirrored = flip.flagged([np.ascontiguousarray(p[:, ::-1]) for p in ims])
    assert int(unaltered.sum()) <= allowed(0.01, len(films)), "too many unaltered films called flipped"
    pooled = (int((~unaltered).sum()) + int(mirrored.sum())) / (2 * len(films))
    assert pooled >= 0.98, f"flip accuracy {pooled:.4f} pooled"
    sources = np.array([f.source for f in films])
    for source in sorted(set(sources)):
        m = sources == source
        if m.sum() < 20:  # openi (6), radiopaedia (2): too few for a per-source rate; they count in the pool
            continue
        acc = (int((~unaltered[m]).sum()) + int(mirrored[m].sum())) / (2 * int(m.sum()))
        assert acc >= FLIP_KNOWN_SHORT.get(source, 0.98), f"flip accuracy {acc:.4f} on {source}"


def test_pediatric_per_source(detector, frontal):
    ped = detector("pediatric")
    labelled = [f for f in frontal if f.pediatric in ("yes", "no") or f.source == "hannover"]
    hit = ped.flagged(images(labelled))
    sources = np.array([f.source for f in labelled])
    truth = np.array([f.pediatric == "yes" for f in labelled])
    for source in sorted(set(sources)):
        m = sources == source
        if m.sum() < 20:
            continue
        acc = float((hit[m] == truth[m]).mean())
        assert acc >= 0.97, f"pediatric accuracy {acc:.4f} on {source} ({int(m.sum())} films)"


def test_pediatric_is_not_fooled_by_low_resolution(detector, frontal):
    """Adult films made to look like the 224 px pediatric copy (square, JPEG) must stay adult."""
    ped = detector("pediatric")
    adults = [f for f in frontal if f.pediatric == "no" or f.source == "hannover"]
    as_is = ped.flagged(images(adults))
    small = ped.flagged([small_jpeg_copy(pixels(f)) for f in adults])
    assert int(small.sum()) <= int(as_is.sum()) + allowed(0.03, len(adults)), (int(as_is.sum()), int(small.sum()))


def test_atypical_is_calibrated_and_catches_what_is_unlike_a_frontal_film(detector, frontal):
    atyp = detector("atypical")
    flagged = atyp.flagged(images(frontal))
    assert int(flagged.sum()) <= allowed(0.01, len(frontal)), f"{int(flagged.sum())} val frontal films flagged"
    adults = [pixels(f) for f in frontal if f.pediatric == "no"][::4]
    rng = np.random.default_rng(0)
    made = {
        "nearly blank": [np.clip(0.5 + 0.03 * (p - 0.5) + rng.normal(0, 0.01, p.shape), 0, 1) for p in adults],
        "washed out": [np.clip(0.85 + 0.1 * p, 0, 1) for p in adults],
        "collimated to a small field": [np.pad(p[p.shape[0] // 3 : -p.shape[0] // 3, p.shape[1] // 3 : -p.shape[1]
                                                  // 3], 150, constant_values=1.0) for p in adults],
    }  # fmt: skip
    for name, ims in made.items():
        hit = atyp.flagged([im.astype(np.float32) for im in ims])
        assert hit.mean() >= 0.9, f"atypical caught {hit.mean():.2f} of {name} films"
    assert atyp.flagged(images(val("not-radiograph"))).mean() >= 0.95


def test_atypical_is_built_on_the_shipped_view_network():
    """atypical embeds the view network's features: retraining view without rebuilding atypical must fail here."""
    import json

    import onnx
    from onnx import numpy_helper

    from tests.helpers import MODELS

    view_version = json.loads((MODELS / "view" / "manifest.json").read_text())["version"]
    backbone = json.loads((MODELS / "atypical" / "manifest.json").read_text())["extra"]["backbone"]
    assert backbone == f"view {view_version}"
    view = [numpy_helper.to_array(i) for i in onnx.load(str(MODELS / "view" / "model.onnx")).graph.initializer]
    atyp = [numpy_helper.to_array(i) for i in onnx.load(str(MODELS / "atypical" / "model.onnx")).graph.initializer]
    convs = [w for w in view if w.ndim == 4]  # the convolution kernels (BatchNorm folded in at export)
    assert len(convs) >= 10
    assert all(any(a.shape == w.shape and np.array_equal(a, w) for a in atyp) for w in convs)


def kermany_like_file(px: np.ndarray, colour: bool, side: int = 224) -> bytes:
    """An adult film stored the way the children's hospital's copy is: a 224 px square 8-bit JPEG file, grey or
    3-channel colour, to go through the gate's own decode."""
    small = (cv2.resize(px, (side, side), interpolation=cv2.INTER_AREA) * 255).round().astype(np.uint8)
    img = np.repeat(small[:, :, None], 3, axis=2) if colour else small
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_adults_stored_like_the_childrens_hospital_files_are_not_called_children(detector, frontal, colour):
    """Adult val films of every adult source (old and new hospitals) as 224 px grey or colour JPEG files, decoded by
    the gate: no more called children than as they came, plus 1% of the films (the decode bug once gave colour
    files of at most 512 px their own intensity mapping, a shortcut to 'child')."""
    from filmgate.decode import decode_bytes

    ped = detector("pediatric")
    adults = [f for f in frontal if f.pediatric == "no" or f.source in ("hannover", "tbx11k", "bimcv-covid19")][::2]
    as_is = ped.flagged(images(adults))
    made = ped.flagged([decode_bytes(kermany_like_file(pixels(f), colour), suffix=".jpg").pixels for f in adults])
    assert len(adults) > 250
    assert int(made.sum()) <= int(as_is.sum()) + allowed(0.01, len(adults)), (int(as_is.sum()), int(made.sum()))
