"""The shipped detectors reach their goals on a fixed subset of ``val`` films, run as the gate runs them.

The subset is fixed (every k-th film per source, in path order) so that the test is reproducible and fast; the full
val figures are in each model's evaluation report (``models/<name>/EVALUATION.md``). Each assertion is the issue's goal
applied to the subset: the allowed count of errors is the goal rate times the subset size, rounded down.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from tests.detectors.conftest import pixels, val_subset

FRONTAL_PER_SOURCE = 24


def allowed(rate: float, n: int) -> int:
    return math.floor(rate * n + 1e-9)


def frontal_subset():
    return val_subset("frontal-chest", FRONTAL_PER_SOURCE)


def test_view_keeps_out_laterals_other_radiographs_and_non_radiographs(detector):
    view = detector("view")
    frontal = frontal_subset()
    others = val_subset("lateral-chest", 20) + val_subset("other-radiograph", 8) + val_subset("not-radiograph", 10)
    assert {f.kind for f in others} == {"lateral-chest", "other-radiograph", "not-radiograph"}
    flagged_frontal = view.flagged([pixels(f) for f in frontal])
    flagged_other = view.flagged([pixels(f) for f in others])
    missed = [f"{f.source}:{f.kind}:{f.path.name}" for f, hit in zip(others, flagged_other, strict=True) if not hit]
    assert len(missed) <= allowed(0.01, len(others)), f"not kept out: {missed}"
    wrongly = [f"{f.source}:{f.path.name}" for f, hit in zip(frontal, flagged_frontal, strict=True) if hit]
    assert len(wrongly) <= max(1, allowed(0.005, len(frontal))), f"frontal films flagged: {wrongly}"
    laterals = [f for f in others if f.kind == "lateral-chest"]
    assert len(laterals) >= 10  # every real val lateral film is in the subset


def test_view_sidecar_class_is_the_kind(detector):
    """The predicted label names what the film is (the gate writes it to the sidecar)."""
    view = detector("view")
    films = val_subset("lateral-chest", 20) + val_subset("not-radiograph", 6) + val_subset("other-radiograph", 4)
    findings = view.manifest.findings(view.outputs([pixels(f) for f in films]))
    right = sum(fd.predicted == f.kind for f, fd in zip(films, findings, strict=True))
    assert right >= 0.9 * len(films), [(f.kind, fd.predicted) for f, fd in zip(films, findings, strict=True)]


def test_flip_finds_mirrored_films_and_leaves_unaltered_ones(detector):
    flip = detector("flip")
    frontal = frontal_subset()
    images = [pixels(f) for f in frontal]
    unaltered = flip.flagged(images)
    mirrored = flip.flagged([np.ascontiguousarray(p[:, ::-1]) for p in images])
    n = len(frontal)
    assert int(unaltered.sum()) <= max(1, allowed(0.01, n)), "too many unaltered films called flipped"
    accuracy = (int((~unaltered).sum()) + int(mirrored.sum())) / (2 * n)
    assert accuracy >= 0.98, f"flip accuracy {accuracy:.4f} on {2 * n} films"


def test_pediatric_per_source_and_not_fooled_by_low_resolution(detector):
    ped = detector("pediatric")
    children = val_subset("frontal-chest", 40, ("kermany", "kermany-fullres"))
    adults = val_subset("frontal-chest", 30, ("nih-cxr14", "chexpert", "hannover"))
    child_hit = ped.flagged([pixels(f) for f in children])
    adult_hit = ped.flagged([pixels(f) for f in adults])
    for source in sorted({f.source for f in children + adults}):
        rows = [(f, h) for f, h in zip(children + adults, np.concatenate([child_hit, adult_hit]), strict=True)]
        rows = [(f, h) for f, h in rows if f.source == source]
        right = sum(bool(h) == (f.pediatric == "yes") for f, h in rows)
        assert right / len(rows) >= 0.97 - 1e-9 or len(rows) - right <= 1, f"{source}: {right}/{len(rows)} right"
    # Adult films made to look like the 224 px pediatric copy (square, JPEG) must stay adult.
    small = [
        cv2.imdecode(
            cv2.imencode(
                ".jpg",
                (cv2.resize(pixels(f), (224, 224), interpolation=cv2.INTER_AREA) * 255).astype(np.uint8),
                [cv2.IMWRITE_JPEG_QUALITY, 90],
            )[1],
            cv2.IMREAD_GRAYSCALE,
        ).astype(np.float32)
        / 255.0
        for f in adults
    ]
    low_res_hit = ped.flagged(small)
    assert int(low_res_hit.sum()) <= max(1, allowed(0.03, len(adults))), "low-resolution adult films called children"


def test_atypical_is_calibrated_and_catches_what_is_unlike_a_frontal_film(detector):
    atyp = detector("atypical")
    frontal = frontal_subset()
    flagged = atyp.flagged([pixels(f) for f in frontal])
    assert int(flagged.sum()) <= max(1, allowed(0.01, len(frontal)))
    base = [pixels(f) for f in frontal[:: max(1, len(frontal) // 24)]]
    blank = [
        np.full_like(p, 0.5) + np.random.default_rng(i).normal(0, 0.01, p.shape).astype(np.float32)
        for i, p in enumerate(base)
    ]
    washed = [np.clip(0.85 + 0.1 * p, 0, 1).astype(np.float32) for p in base]
    zoomed = [
        p[p.shape[0] // 3 : p.shape[0] // 3 + p.shape[0] // 5, p.shape[1] // 3 : p.shape[1] // 3 + p.shape[1] // 5]
        for p in base
    ]
    for name, images in (("blank", blank), ("washed-out", washed), ("zoomed", zoomed)):
        hit = atyp.flagged(images)
        assert hit.mean() >= 0.9, f"atypical caught {hit.mean():.2f} of {name} films"
    ct = val_subset("not-radiograph", 10)
    assert atyp.flagged([pixels(f) for f in ct]).mean() >= 0.9
