"""The training package on real films: a tiny fit exports, passes parity, loads in onnxruntime and ships a folder the
gate can load; runs are reproducible; configs fail loudly; metrics and label transforms are right."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from filmgate.decode import decode_file
from filmgate.detectors import onnx_session
from filmgate.manifest import load_manifest
from filmgate.preprocess import preprocess
from filmgate_training.config import AugmentConfig, ConfigError, config_from_dict, load_config
from filmgate_training.datasets import select
from filmgate_training.evaluate import evaluate, onnx_runner, write_report
from filmgate_training.export import export, ship
from filmgate_training.metrics import choose_threshold, margin_threshold, roc_auc
from filmgate_training.tasks import get_task
from filmgate_training.train import fit, load_trained


def tiny_config(tmp_path, task="orientation", seed=0, run="run"):
    return config_from_dict(
        {
            "task": task,
            "preprocessing": {"size": 64, "resize": "letterbox", "normalize": "zscore"},
            "data": {"cache_dir": str(tmp_path / "cache"), "max_train_films": 12, "max_val_films": 3, "workers": 1},
            "model": {"widths": [8, 16, 32], "dropout": 0.2},
            "train": {
                "steps": 4,
                "batch_size": 8,
                "warmup_steps": 1,
                "checkpoint_every": 2,
                "progress": False,
                "seed": seed,
            },  # fmt: skip
            "evaluate": {
                "parity_films": 3,
                "checks": [{"path": "dicom/pydicom__RG1_J2KI.dcm", "flagged": False, "why": "MONOCHROME1 chest"}],
            },
            "run_dir": str(tmp_path / run),
            "models_dir": str(tmp_path / "models"),
        }
    )


def test_tiny_fit_exports_loads_in_onnxruntime_and_ships(tmp_path, data_dir):
    config = tiny_config(tmp_path)
    fit(config)
    onnx_path = export(config)
    parity = json.loads((config.run_path / "parity.json").read_text())
    assert parity["inputs"] == 12  # 3 real val films x 4 variants
    assert parity["max_abs_diff"] <= 1e-3

    session = onnx_session(onnx_path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    for n in (1, 5):  # dynamic batch
        out = session.run(["output"], {"image": np.zeros((n, 1, 64, 64), np.float32)})[0]
        assert out.shape == (n, 4)

    from filmgate.manifest import sha256_file

    report = evaluate(config, onnx_runner(onnx_path), {"sha256": sha256_file(onnx_path)})
    assert report["val_films"] == 3
    assert set(report["val"]["per_source"]) <= {f.source for f in select(split="val", kind="frontal-chest")}
    assert 0.5 <= report["threshold"] <= 1.0
    write_report(report, config.run_path)
    folder = ship(config)
    manifest = load_manifest(folder)  # the gate's loader: schema + sha256
    assert manifest.name == "orientation" and manifest.reason == "rotated"
    assert manifest.labels == ("upright", "rot90", "rot180", "rot270")
    assert manifest.preprocessing.size == 64
    assert manifest.threshold == report["threshold"]
    assert {d["source"] for d in manifest.training_data} and all(d["licence"] for d in manifest.training_data)
    assert (folder / "MODEL_CARD.md").read_text().startswith("# Model card: `orientation`")
    assert (folder / "evaluation.md").is_file() and (folder / "evaluation.json").is_file()
    # the quantise step of the one ship path: an int8 copy checked against this very model, or why there is none
    if manifest.quantized is None:
        assert manifest.extra["int8_refused"].startswith("int8 parity failed"), manifest.extra
    else:
        assert manifest.quantized.quantization["from_sha256"] == manifest.sha256
        assert manifest.quantized.parity["held_out_train"]["examples"] > 0
        assert "<!-- int8:begin" in (folder / "MODEL_CARD.md").read_text() and (folder / "int8.json").is_file()


def test_export_parity_on_real_films_batch_and_single(tmp_path, data_dir):
    """torch and onnxruntime agree on real decoded films, one at a time and batched."""
    config = tiny_config(tmp_path, task="inversion")
    fit(config)
    onnx_path = export(config)
    model, _ = load_trained(config.run_path)
    films = select(split="val", kind="frontal-chest")[::97][:6]
    x = np.stack([preprocess(decode_file(f.path).pixels, config.preprocessing) for f in films])
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    session = onnx_session(onnx_path)
    batched = session.run(["output"], {"image": x})[0]
    single = np.concatenate([session.run(["output"], {"image": x[i : i + 1]})[0] for i in range(len(x))])
    assert np.abs(batched - expected).max() < 1e-4
    assert np.abs(single - expected).max() < 1e-4


def test_fit_is_reproducible(tmp_path, data_dir):
    a, b = fit(tiny_config(tmp_path, run="a")), fit(tiny_config(tmp_path, run="b"))
    sa, sb = torch.load(a, weights_only=False)["state_dict"], torch.load(b, weights_only=False)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = fit(tiny_config(tmp_path, run="c", seed=1))
    sc = torch.load(c, weights_only=False)["state_dict"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    import filmgate_training.train as train_module

    uninterrupted = torch.load(fit(tiny_config(tmp_path, run="whole")), weights_only=False)["state_dict"]
    real_make_batch, calls = train_module.make_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(tmp_path, run="cut"))
    after: list[int] = []

    def counting(*args, **kwargs):
        after.append(1)
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_batch", counting)
    resumed = torch.load(fit(tiny_config(tmp_path, run="cut")), weights_only=False)
    assert len(after) == 2  # steps 3 and 4 only: it resumed from the checkpoint at step 2
    assert all(torch.equal(uninterrupted[k], resumed["state_dict"][k]) for k in uninterrupted)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        config_from_dict({"task": "orientation", "train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"train\.steps: must be an integer"):
        config_from_dict({"task": "orientation", "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"^evaluate: threshold_rule must be fpr or margin"):
        config_from_dict({"task": "view", "evaluate": {"threshold_rule": "best"}})
    with pytest.raises(ConfigError, match="model.mirror_swap"):
        get_task("view").serving_model(object(), mirror_swap=True)
    with pytest.raises(ConfigError, match="registered"):
        config_from_dict({"task": "no-such-task"})
    with pytest.raises(ConfigError, match="preprocessing"):
        config_from_dict({"task": "orientation", "preprocessing": {"size": 128, "resize": "crop"}})
    for name in ("orientation", "inversion"):
        assert load_config(name).task == name  # the shipped configs parse


def test_excluded_rows_are_left_out_everywhere():
    from filmgate_training.data import split_train, val_films

    bad = "images/nih-cxr14/no_finding_00003490_011.jpg"
    plain = config_from_dict({"task": "orientation"})
    config = config_from_dict({"task": "orientation", "data": {"exclude": [{"path": bad, "why": "upside down"}]}})
    task = get_task("orientation")
    assert bad in {f.rel for f in val_films(plain, task)}
    assert bad not in {f.rel for f in val_films(config, task)}
    train, calib = split_train(config, task)
    assert len(val_films(config, task)) == len(val_films(plain, task)) - 1
    assert bad not in {f.rel for f in train + calib}


def test_folders_of_films_join_the_training_rows(tmp_path, data_dir):
    """A folder of PNG/JPEG/DICOM films (another hospital, say) is read next to labels.csv."""
    import shutil

    from filmgate_training.data import split_train, training_pool

    folder = tmp_path / "hospital"
    (folder / "sub").mkdir(parents=True)
    for i, film in enumerate(select(split="train", kind="frontal-chest", source="hannover")[:3]):
        shutil.copyfile(film.path, folder / ("sub" if i else "") / f"film{i}.jpg")
    shutil.copyfile(data_dir / "dicom" / "fo-dicom__CR-MONO1-10-chest.dcm", folder / "chest.dcm")
    (folder / "notes.txt").write_text("not a film")
    config = config_from_dict(
        {
            "task": "inversion",
            "data": {
                "cache_dir": str(tmp_path / "cache"),
                "calibration_fraction": 0.0,
                "folders": [{"path": str(folder), "source": "hospital-x", "licence": "test"}],
            },
        }
    )
    train, _ = split_train(config, get_task("inversion"))
    extra = [f for f in train if f.source == "hospital-x"]
    assert sorted(f.path.name for f in extra) == ["chest.dcm", "film0.jpg", "film1.jpg", "film2.jpg"]
    pool = training_pool(config, get_task("inversion"), extra)
    assert len(pool.films) == 4 and pool.cache.image(0).max() <= 1.0
    # a folder labelled for the labelled tasks: a hospital's children's films join pediatric's "child" class
    kids = config_from_dict({"task": "pediatric", "data": {"cache_dir": str(tmp_path / "cache"), "folders": [
        {"path": str(folder), "source": "hospital-x", "pediatric": "yes"}]}})  # fmt: skip
    task = get_task("pediatric")
    train, calib = split_train(kids, task)
    theirs = [f for f in train + calib if f.source == "hospital-x"]
    assert len(theirs) == 4 and {task.labels[task.label_of(f)] for f in theirs} == {"child"}
    with pytest.raises(ConfigError, match=r"data\.folders\[0\].*pediatric must be yes, no or empty"):
        config_from_dict({"task": "pediatric", "data": {"folders": [{"path": ".", "source": "x", "pediatric": "y"}]}})


def test_auc_and_threshold():
    rng = np.random.default_rng(0)
    pos = rng.random(40) > 0.5
    scores = np.round(rng.random(40), 1)  # ties
    pairs = [
        (s1, s0)
        for s1, p1 in zip(scores, pos, strict=True)
        for s0, p0 in zip(scores, pos, strict=True)
        if p1 and not p0
    ]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert roc_auc(pos, scores) == pytest.approx(brute)
    neg = np.array([0.1, 0.2, 0.9, 0.95])
    assert choose_threshold(neg, 0.0, 0.5) > 0.95  # nothing may be flagged
    assert 0.9 < choose_threshold(neg, 0.25, 0.5) <= 0.95  # one of four may be flagged
    assert choose_threshold(np.array([0.1, 0.2]), 0.0, 0.5) == 0.5  # never below the floor


def test_margin_threshold_sits_in_the_middle_of_the_gap_or_falls_back():
    neg = np.array([0.01, 0.02, 0.05])
    t, rule = margin_threshold(neg, np.array([0.95, 0.99]), 0.0, 0.01)
    edge = choose_threshold(neg, 0.0, 0.01)
    assert rule == "margin" and edge < t < 0.95
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert logit(t) - logit(edge) == pytest.approx(logit(0.95) - logit(t))  # the middle, in log-odds
    # a positive at or below the edge: the classes overlap there, recall first
    assert margin_threshold(neg, np.array([0.04, 0.9]), 0.0, 0.01) == (edge, "fpr")
    assert margin_threshold(neg, np.array([]), 0.0, 0.01) == (edge, "fpr")


def test_mirror_swap_is_exactly_mirror_consistent():
    """The exported flip model: a film and its mirror image get swapped logits, whatever the weights are."""
    import torch

    from filmgate_training.model import FilmNet, MirrorSwap

    torch.manual_seed(0)
    net = MirrorSwap(FilmNet(2, (8, 16), 0.0)).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        a, b = net(x), net(torch.flip(x, dims=[3]))
    assert torch.allclose(a, b.flip(1), atol=1e-5)
    assert not torch.allclose(a[:, 0], a[:, 1])  # not trivially constant


def test_synthetic_labels_are_the_transform_and_nothing_else():
    """With augmentation off, a training example is exactly the label's transform of the film."""
    img = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    off = AugmentConfig(**{f: 0.0 for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")})
    orientation = dataclasses.replace(get_task("orientation"), nuisance_p=0.0)
    inversion = dataclasses.replace(get_task("inversion"), nuisance_p=0.0)
    for seed in range(8):
        ex = orientation.train_example(img, None, np.random.default_rng(seed), off)
        assert np.array_equal(ex.pixels, np.rot90(img, ex.label))
        ex = inversion.train_example(img, None, np.random.default_rng(seed), off)
        assert np.allclose(ex.pixels, 1.0 - img if ex.label else img)
    # Nuisance faults (another detector's business) change the pixels, never the label.
    always_inverted = dataclasses.replace(orientation, nuisance_p=1.0)
    for seed in range(8):
        ex = always_inverted.train_example(img, None, np.random.default_rng(seed), off)
        assert np.allclose(ex.pixels, 1.0 - np.rot90(img, ex.label))
    variants = orientation.eval_examples(img, None)
    assert [v.variant for v in variants] == ["upright", "rot90", "rot180", "rot270"]
    assert [v.pixels.shape for v in variants] == [(30, 20), (20, 30), (30, 20), (20, 30)]
    seen = {orientation.train_example(img, None, np.random.default_rng(s), off).label for s in range(40)}
    assert seen == {0, 1, 2, 3}


def test_augmentations_keep_films_valid():
    from filmgate_training.augment import display_augment, film_augment

    img = decode_file(select(split="train", kind="frontal-chest", source="hannover")[0].path).pixels
    always = AugmentConfig(**{f: 1.0 for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")})
    for seed, cfg in itertools.product(range(5), (always, AugmentConfig())):
        rng = np.random.default_rng(seed)
        out = display_augment(film_augment(img, rng, cfg), rng, cfg)
        assert out.dtype == np.float32 and out.ndim == 2 and min(out.shape) >= 8
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_copy_augmentations_treat_a_film_and_its_mirror_alike():
    """The hospital-copy augmentations (low resolution, JPEG, screenshot, photograph) run after the label transform:
    drawn the same way, a film and its mirror image come out the same size and, for the copies that keep the film's
    geometry (a small copy, JPEG), as mirror images of each other up to JPEG's 8x8 blocks; so a flip detector cannot
    read its label from them. Off by default, so the detectors trained before them train as they did."""
    from filmgate_training.augment import copy_augment, display_augment

    img = decode_file(select(split="train", kind="frontal-chest", source="hannover")[0].path).pixels
    img = np.ascontiguousarray(img[:192, :160])
    off = AugmentConfig(**{f: 0.0 for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")})
    assert np.array_equal(display_augment(img, np.random.default_rng(0), AugmentConfig(p_window=0, p_gamma=0,
                          p_contrast=0, p_blur=0, p_noise=0, p_text_overlay=0, p_pad=0)), img)  # fmt: skip
    small = dataclasses.replace(off, p_low_res=1.0, low_res_min=96, low_res_max=120, p_jpeg=1.0, jpeg_quality_min=50,
                                jpeg_quality_max=50)  # fmt: skip
    for seed in range(6):
        a = copy_augment(img, np.random.default_rng(seed), small)
        b = copy_augment(np.ascontiguousarray(img[:, ::-1]), np.random.default_rng(seed), small)
        assert a.shape == b.shape and 96 <= max(a.shape) <= 120
        assert not np.array_equal(a, img[: a.shape[0], : a.shape[1]])  # it did change the film
        assert float(np.abs(a - b[:, ::-1]).mean()) < 0.02
    for p in ("p_screenshot", "p_photo"):
        cfg = dataclasses.replace(off, **{p: 1.0})
        for seed in range(4):
            a = copy_augment(img, np.random.default_rng(seed), cfg)
            b = copy_augment(np.ascontiguousarray(img[:, ::-1]), np.random.default_rng(seed), cfg)
            assert a.shape == b.shape and a.shape != img.shape
            assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0


def test_cli_lists_tasks_and_reports_config_errors(capsys):
    from filmgate_training.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "orientation: classifier, labels ['upright', 'rot90', 'rot180', 'rot270'], reason rotated" in out
    assert "inversion: classifier, labels ['normal', 'inverted'], reason inverted" in out
    assert main(["fit", "--config", "orientation", "--set", "train.stepz=10"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert main(["evaluate", "--config", "orientation", "--set", "run_dir=/nonexistent/run"]) == 2
    assert "run `python -m filmgate_training export` first" in capsys.readouterr().err


def test_pediatric_trains_on_spine_films_but_is_measured_where_the_gate_uses_it():
    from filmgate_training.data import split_train, val_films

    config = load_config("pediatric-ft")
    task = get_task("pediatric")
    train, _ = split_train(config, task)
    assert any(f.source == "spine" for f in train), "spine films of both classes are the anti-shortcut set"
    val = val_films(config, task)
    assert val and {f.kind for f in val} == {"frontal-chest"}
    assert {"chexpert", "hannover", "kermany", "nih-cxr14"} <= {f.source for f in val}
