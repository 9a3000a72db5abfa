"""The shipped int8 models (what the gate runs on CPU) agree with their float models on real films.

Every detector ships its float model (``file``, the one training evaluated, run on CUDA) and an int8 copy
(``quantized``, run on CPU), made by ``python -m filmgate_training quantize``. Here both are judged by the gate's own
judge on a fixed set of real val films in every variant the detector is evaluated on: the same verdict for each, and
scores within a tolerance. The val and leave-one-source-out figures of the int8 models are the shipped tests'
(test_shipped_models, test_shipped_loso run the int8 models, as the gate does on CPU) and the cards'.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from filmgate.config import parse_config
from filmgate.detectors import DetectorSet
from filmgate.manifest import ManifestError, load_manifest, sha256_file
from filmgate_training.config import config_from_dict
from filmgate_training.datasets import select
from filmgate_training.tasks import get_task
from tests.helpers import MODELS, ShippedDetector, assert_same_parity, pixels

NAMES = ("orientation", "inversion", "flip", "view", "pediatric", "atypical")
FILMS = 40  # val frontal films, evenly spaced in path order, and 12 of the other kinds
# Largest score difference allowed on these films, by kind of detector: a probability (classifiers); a distance
# (atypical, threshold about 1.4: 7% of it); an age in years (the candidate age model moved by up to 2.0 years on
# val films, far from the 10-year cut; its verdicts did not change). The shipped models stay well inside (cards).
SCORE_TOLERANCE = {"classifier": 0.1, "score": 0.1, "age": 2.5}


def fixed_films(name: str) -> list[tuple[np.ndarray, str]]:
    """(pixels, what) for the fixed films, each in every variant the detector's evaluation uses."""
    manifest = load_manifest(MODELS / name)
    task = get_task(config_from_dict(manifest.extra["config"]).task)
    frontal = sorted(select(split="val", kind="frontal-chest"), key=lambda f: str(f.path))
    others = sorted((f for f in select(split="val") if f.kind != "frontal-chest"), key=lambda f: str(f.path))
    films = frontal[:: len(frontal) // FILMS][:FILMS] + others[:: max(1, len(others) // 12)][:12]
    out = []
    for film in films:
        px = pixels(film)
        examples = task.eval_examples(px, film) if task.films([film], "val") else []  # else: as it came
        out += [(np.ascontiguousarray(ex.pixels), f"{film.rel} {ex.variant}") for ex in examples] or [(px, film.rel)]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_detector_ships_an_int8_model_made_from_its_float_model(name):
    manifest = load_manifest(MODELS / name)  # checks both files' sha256
    q = manifest.quantized
    assert q is not None, f"models/{name}: no int8 model (python -m filmgate_training quantize --config ...)"
    assert q.precision == "int8" and q.providers == ("CPUExecutionProvider",)
    assert q.quantization["from_sha256"] == manifest.sha256 == sha256_file(MODELS / name / manifest.file)
    assert q.quantization["calibration_split"].startswith("train")
    trained = {r["source"] for r in manifest.training_data}
    assert set(q.quantization["calibration_sources"]) <= trained  # never a held-out source of the LOSO figures
    assert q.parity["held_out_train"]["verdicts_changed"] <= max(1, 0.005 * q.parity["held_out_train"]["examples"])
    assert q.parity["not_worse"], f"models/{name}: int8 worse than fp32 on val or LOSO ({q.parity['criterion']})"
    # the comparison covers every held-out source the manifest reports (rerun it after `loso --card` adds one)
    assert set(q.parity["loso"]) == {key.split(" (")[0] for key in manifest.metrics.get("loso", {})}


@pytest.mark.parametrize("name", NAMES)
def test_int8_model_gives_the_float_models_verdicts_on_real_films(name):
    fp32, int8 = ShippedDetector(name, precision="fp32"), ShippedDetector(name)
    assert fp32.judge.detectors.detectors[0].precision == "fp32"
    assert int8.judge.detectors.detectors[0].precision == "int8"
    items = fixed_films(name)
    images = [px for px, _ in items]
    a, b = fp32.scores(images), int8.scores(images)
    fa, fb = fp32.manifest.flagged(a), fp32.manifest.flagged(b)
    changed = [what for (_, what), x, y in zip(items, fa, fb, strict=True) if x != y]
    assert not changed, f"{name}: verdicts changed by int8 on {changed}"
    tolerance = SCORE_TOLERANCE[fp32.manifest.kind]
    assert float(np.abs(a - b).max()) <= tolerance, f"{name}: max score difference {np.abs(a - b).max():.4f}"
    assert len(images) >= 50


def test_the_gate_runs_int8_on_cpu_and_float_when_told():
    for provider in ("cpu", "auto"):  # auto: no usable GPU here, so onnxruntime runs on CPU and so does int8
        det = DetectorSet.load(parse_config({"detectors": {"provider": provider}}).detectors)
        assert {d["precision"] for d in det.describe()} == {"int8"}, det.describe()
        assert {d.provider for d in det.detectors} == {"CPUExecutionProvider"}
    det = DetectorSet.load(parse_config({"detectors": {"provider": "cpu", "precision": "fp32"}}).detectors)
    assert {d["precision"] for d in det.describe()} == {"fp32"}


def test_a_changed_int8_file_is_refused(tmp_path):
    folder = tmp_path / "flip"
    shutil.copytree(MODELS / "flip", folder)
    q = load_manifest(folder).quantized
    assert q is not None
    data = bytearray((folder / q.file).read_bytes())
    data[-1] ^= 1
    (folder / q.file).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256 of model.int8.onnx"):
        load_manifest(folder)


@pytest.mark.parametrize("name", ["inversion", "atypical"])  # a classifier, and the score with float MatMuls
def test_the_shipped_int8_model_is_what_the_quantise_step_makes(tmp_path, name):
    """The ship path's quantise step, run again on the shipped float model, makes the shipped int8 file byte for
    byte (calibration films, ranges and layers left in float are all fixed), with the same parity figures."""
    import dataclasses

    from filmgate.manifest import write_manifest
    from filmgate_training.quantize import quantize_folder

    folder = tmp_path / name
    shutil.copytree(MODELS / name, folder)
    for graph in MODELS.glob("graph-*"):  # a graph the detector shares with others (manifest.graph) lies beside it
        shutil.copytree(graph, tmp_path / graph.name)
    shipped = load_manifest(folder)
    assert shipped.quantized is not None
    (folder / shipped.quantized.file).unlink()
    write_manifest(folder, dataclasses.replace(shipped, quantized=None))
    quantize_folder(folder)
    made = load_manifest(folder).quantized
    assert made is not None and made.sha256 == shipped.quantized.sha256
    assert_same_parity(made.parity["held_out_train"], shipped.quantized.parity["held_out_train"])
