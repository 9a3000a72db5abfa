"""Fixtures of the service tests (their helpers are in tests/helpers.py, the one module tests import helpers from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from filmgate_training.datasets import select
from tests.helpers import (
    _STARTED,
    CR_STORAGE,
    CT_STORAGE,
    MODELS,
    Fixture,
    compress,
    film_pixels,
    make_dicom,
    normalise,
)


@pytest.fixture(autouse=True, scope="session")
def _reap_gates():
    """A failed test must not leave a node running."""
    yield
    for gate in _STARTED:
        if gate.proc is not None and gate.proc.poll() is None:
            gate.proc.kill()
            gate.proc.wait(10)


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
