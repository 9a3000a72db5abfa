"""Preprocessing and manifest scoring: the parts that make training and serving agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from filmgate.manifest import ManifestError, ModelManifest, discover, load_manifest, sha256_file, write_manifest
from filmgate.preprocess import PreprocessSpec, preprocess, preprocess_batch


def test_letterbox_keeps_aspect_and_zeroes_padding():
    img = np.random.default_rng(1).random((100, 50), dtype=np.float32)
    out = preprocess(img, PreprocessSpec(size=64))
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    assert np.all(out[0, :, :15] == 0) and np.all(out[0, :, -15:] == 0)
    content = out[0, :, 17:47]
    assert abs(float(content.mean())) < 0.05 and abs(float(content.std()) - 1) < 0.05


def test_zscore_is_invariant_to_window_and_gain():
    img = np.random.default_rng(2).random((80, 80), dtype=np.float32)
    spec = PreprocessSpec(size=32)
    assert np.allclose(preprocess(img, spec), preprocess(img * 0.5 + 0.2, spec), atol=1e-4)


def test_unit_mode_keeps_brightness():
    img = np.full((40, 40), 0.9, dtype=np.float32)
    out = preprocess(img, PreprocessSpec(size=16, normalize="unit"))
    assert np.allclose(out, 0.9)


def test_batch_matches_single():
    imgs = [np.random.default_rng(i).random((60 + i, 70), dtype=np.float32) for i in range(3)]
    spec = PreprocessSpec(size=32)
    batch = preprocess_batch(imgs, spec)
    assert batch.shape == (3, 1, 32, 32)
    assert np.array_equal(batch[1], preprocess(imgs[1], spec))


@pytest.mark.parametrize("bad", [{"size": 8}, {"resize": "crop"}, {"normalize": "minmax"}, {"sise": 128}])
def test_bad_spec_names_the_key(bad):
    with pytest.raises(ValueError, match="preprocessing"):
        PreprocessSpec.from_dict(bad)


def orientation_manifest(**changes) -> dict:
    data = {
        "name": "orientation",
        "version": "1",
        "file": "model.onnx",
        "kind": "classifier",
        "reason": "rotated",
        "labels": ["upright", "rot90", "rot180", "rot270"],
        "positive_labels": ["rot90", "rot180", "rot270"],
        "threshold": 0.5,
        "preprocessing": {"size": 128},
    }
    data.update(changes)
    return data


def test_classifier_score_is_softmax_mass_of_positive_labels():
    m = ModelManifest.from_dict(orientation_manifest())
    logits = np.array([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    found = m.findings(logits)
    assert not found[0].flagged and found[0].predicted == "upright"
    assert found[1].flagged and found[1].predicted == "rot180" and found[1].score > 0.95
    assert np.allclose(m.scores(logits), [f.score for f in found])
    assert m.findings(logits, threshold=0.999)[1].flagged is False


def test_score_kind_uses_raw_output():
    m = ModelManifest.from_dict(orientation_manifest(kind="score", labels=[], positive_labels=[], threshold=3.0))
    found = m.findings(np.array([[1.0], [4.0]]))
    assert [f.flagged for f in found] == [False, True]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "regression"}, "kind"),
        ({"positive_labels": ["sideways"]}, "positive_labels"),
        ({"reason": ""}, "reason"),
    ],
)
def test_invalid_manifest(change, message):
    with pytest.raises(ManifestError, match=message):
        ModelManifest.from_dict(orientation_manifest(**change))


def test_manifest_round_trip_and_sha_check(tmp_path):
    folder = tmp_path / "orientation"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not really onnx")
    m = ModelManifest.from_dict(orientation_manifest(sha256=sha256_file(folder / "model.onnx")))
    write_manifest(folder, m)
    assert load_manifest(folder) == m
    assert [p.name for p, _ in discover(tmp_path)] == ["orientation"]
    (folder / "model.onnx").write_bytes(b"changed")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ManifestError, match="required"):
        load_manifest(folder)


def test_both_configurations_read_their_files_by_one_reader(tmp_path):
    """The gate's and a training run's load_config share typed_config.read_yaml: the same messages for the same
    mistakes, the file named first."""
    from filmgate.config import load_config as gate_config
    from filmgate.typed_config import ConfigError
    from filmgate_training.config import load_config as training_config

    for text, message in (("- a\n- list\n", "the top level must be a mapping"), ("a: [\n", "not valid YAML")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        for load in (gate_config, training_config):
            with pytest.raises(ConfigError, match=f"^{path}: {message}"):
                load(path)
