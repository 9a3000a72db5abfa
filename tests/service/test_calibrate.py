"""`filmgate calibrate`: a site's films in, a configuration the gate loads and a report out, the models untouched.

The site is a folder of real val films from a hospital of the new sources (TBX11K, China), as DICOM and as the JPEG
files they are, started from a copy of our own default.yaml in which the site had set the orientation and flip
thresholds far too low (1e-6 and 1e-4): calibration must raise both until at most --target of the site's films are
flagged, while the synthetic rotations and mirrors made from the same films are still caught at their goals.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import yaml

from filmgate.config import load_config
from filmgate.judge import Judge
from filmgate_training.datasets import select
from tests.helpers import MODELS, REPO, film_pixels, make_dicom

LOW = {"orientation": 1e-6, "flip": 1e-4}  # low enough that each flags well over TARGET of these 30 clean films
TARGET = 0.05


def models_fingerprint() -> str:
    h = hashlib.sha256()
    for p in sorted(MODELS.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(MODELS).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_calibrate_writes_an_override_that_check_config_accepts_and_the_gate_loads(tmp_path):
    films = [f for f in select(split="val", kind="frontal-chest", source="tbx11k")][:30]
    assert len(films) == 30
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "jpeg").mkdir()
    for i, film in enumerate(films):
        if i % 2:
            make_dicom(film_pixels(film.path), site / "dicom" / f"{i:03d}.dcm")
        else:
            (site / "jpeg" / f"{i:03d}{film.path.suffix}").write_bytes(film.path.read_bytes())
    (site / "notes.txt").write_text("not a film: skipped")
    base = yaml.safe_load((REPO / "service" / "default.yaml").read_text())
    base["policy"]["thresholds"] = dict(LOW)
    (tmp_path / "filmgate.yaml").write_text(yaml.safe_dump(base))
    before = models_fingerprint()

    out, report = tmp_path / "out" / "site.yaml", tmp_path / "out" / "site.md"
    run = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "calibrate", str(site), "--out", str(out), "--config", "filmgate.yaml",
         "--sample", "0", "--target", str(TARGET), "--recall", "rotated=0.95", "--recall", "flipped=0.9"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "30 judged, 0 undecodable" in run.stderr
    assert models_fingerprint() == before  # never touches the models

    check = subprocess.run([sys.executable, "-m", "filmgate.cli", "check-config", str(out)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stderr
    cfg = load_config(out)
    thresholds = dict(cfg.policy.thresholds)
    assert cfg.listener.port == base["listener"]["port"]  # the base configuration is kept, only thresholds change
    for name, low in LOW.items():
        assert thresholds[name] > low, f"{name} was not raised: {thresholds}"

    # The gate loads it and judges with the proposed thresholds; on the site's own films they hold the target.
    judge = Judge.load(cfg)
    verdicts = [j for _, j in judge.judge_many(sorted(site.rglob("*.dcm")) + sorted(site.rglob("*.jp*g")))]
    assert len(verdicts) == 30
    for name in LOW:
        used = {f.threshold for v in verdicts for f in v.decision.findings if f.detector == name}
        assert used == {thresholds[name]}
        flagged = np.mean([v.decision.scores[name] >= thresholds[name] for v in verdicts])
        assert flagged <= TARGET + 1e-9, (name, flagged)

    # The report gives every detector's flag rate, and recall on the synthetic faults where there are some.
    text = report.read_text()
    for det in judge.detectors.detectors:
        assert f"| {det.name} | {det.manifest.reason} |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    faults = {name: rows[name].split("|")[7].strip() for name in ("orientation", "flip", "inversion")}
    assert int(faults["orientation"]) == 3 * int(faults["flip"]) == 3 * int(faults["inversion"]) > 0  # per film
    assert "| - |" in rows["view"]  # no synthetic fault: no recall claimed


def test_calibrate_help_has_an_example():
    run = subprocess.run([sys.executable, "-m", "filmgate.cli", "calibrate", "--help"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0
    assert "examples:" in run.stdout and "filmgate calibrate /data/site-sample --out site.yaml" in run.stdout


def test_proposal_respects_the_recall_goal():
    """Pure rule: the target is met where recall allows, else the threshold stops where recall would fall."""
    from filmgate.calibrate import propose

    clean = np.linspace(0.0, 0.9, 100)  # 10 films score >= 0.82
    faults = np.concatenate([np.full(95, 0.99), np.linspace(0.5, 0.6, 5)])
    t, note = propose(clean, faults, 0.5, target=0.01, goal=0.9)
    assert (clean >= t).mean() <= 0.01 and (faults >= t).mean() >= 0.9 and "target reached" in note
    t, note = propose(clean, faults, 0.5, target=0.01, goal=0.99)  # 0.99 recall needs t <= 0.525
    assert (faults >= t).mean() >= 0.99 and (clean >= t).mean() > 0.01 and "not reached" in note
    t, note = propose(clean, None, 0.5, target=0.01, goal=None)
    assert t == 0.5 and "kept" in note
