"""Leave-one-source-out evaluation (``python -m filmgate_training loso``), the Wilson interval, building on a
shipped model from its ONNX file, the atypical build through ``all`` and ``finish``: on real films, tiny runs."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from filmgate.detectors import onnx_session
from filmgate.manifest import load_manifest
from filmgate_training import loso
from filmgate_training.config import config_from_dict, load_config
from filmgate_training.data import split_train
from filmgate_training.metrics import wilson_interval
from filmgate_training.model import filmnet_from_onnx
from filmgate_training.tasks import get_task
from filmgate_training.train import load_trained
from tests.training.test_framework import tiny_config

REPO_MODELS = loso.REPO_ROOT / "models"


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(5, 100)
    assert lo == pytest.approx(0.0215, abs=1e-4) and hi == pytest.approx(0.1118, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_shipped_model_rebuilt_from_onnx_is_the_shipped_function():
    """Building on a shipped model needs no run folder: its ONNX file rebuilt in torch computes the same logits."""
    folder = REPO_MODELS / "view"
    net = filmnet_from_onnx(str(folder / "model.onnx"))
    x = np.random.default_rng(0).normal(size=(3, 1, 128, 128)).astype(np.float32)
    ref = onnx_session(folder / "model.onnx").run(None, {"image": x})
    with torch.inference_mode():
        out = net(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref[0]).max() < 1e-4


def test_fold_leaves_the_source_out_of_training_and_calibration_and_scores_all_of_it(tmp_path, data_dir):
    config = tiny_config(tmp_path)
    fc = loso.fold_config(config, "chexpert")
    assert fc.data.exclude_sources == ("chexpert",) and fc.run_path == config.run_path / "loso" / "chexpert"
    task = get_task(config.task)
    trained, calib = split_train(dataclass_without_cap(fc), task)
    assert trained and calib and not any(f.source == "chexpert" for f in trained + calib)
    held = loso.held_out_films(fc, task, "chexpert")
    assert {f.split for f in held} == {"train", "val"} and all(f.source == "chexpert" for f in held)

    row = loso.fold(config, "chexpert", {"train.steps": 2}, limit=6)
    assert row["mode"] == "fold" and row["source"] == "chexpert" and row["films"] == 6
    classes = row["classes"]
    assert set(classes) == set(task.labels)  # every variant of every film: upright (clean) and the three turns
    assert classes["upright"]["role"] == "false flags" and classes["rot90"]["role"] == "caught"
    ff = row["false_flags"]
    assert ff["examples"] == 6 and ff["ci95"][0] <= ff["rate"] <= ff["ci95"][1]
    assert row["caught"]["examples"] == 18
    short = loso.fold_config(config, "chexpert", {"train.steps": 2})  # a fold of another length: its own folder
    assert short.run_path == config.run_path / "loso" / "chexpert-2steps" and not fc.run_path.exists()
    assert json.loads((short.run_path / "loso.json").read_text())["source"] == "chexpert"
    _, blob = load_trained(short.run_path)
    assert "chexpert" not in blob["train_films"]


def dataclass_without_cap(config):
    d = config.to_dict()
    d["data"]["max_train_films"] = None
    return config_from_dict(d)


def test_unseen_scores_the_shipped_model_only_on_sources_it_never_trained_on(data_dir):
    config = load_config("flip-hr")
    trained = {r["source"] for r in load_manifest(REPO_MODELS / "flip").training_data}
    rows = loso.unseen(config, limit=3, min_films=20)
    assert rows and all(r["source"] not in trained and r["mode"] == "unseen" for r in rows)
    assert {"tbx11k", "bimcv-covid19"} <= {r["source"] for r in rows}  # the hospitals added on 2026-12-01


def test_report_merges_rows_and_writes_the_card_section(tmp_path, monkeypatch):
    monkeypatch.setattr(loso, "REPORTS", tmp_path / "reports")
    folder = tmp_path / "models" / "atypical"
    folder.mkdir(parents=True)
    for name in ("model.onnx", "model.int8.onnx", "manifest.json", "MODEL_CARD.md", "evaluation.json"):
        (folder / name).write_bytes((REPO_MODELS / "atypical" / name).read_bytes())
    import shutil

    shutil.copytree(REPO_MODELS / "graph-view-atypical", tmp_path / "models" / "graph-view-atypical")  # manifest.graph
    ff = {"examples": 10, "flagged": 1, "rate": 0.1, "ci95": list(wilson_interval(1, 10))}
    row = {"source": "tbx11k", "mode": "fold", "model": "fold: refit", "films": 10, "classes": {}, "false_flags": ff}
    loso.merge("atypical", [row])
    report = loso.merge("atypical", [row | {"films": 12}])  # same source, mode and model: replaced
    assert len(report["rows"]) == 1 and report["rows"][0]["films"] == 12
    loso.write_card_section("atypical", tmp_path / "models")
    loso.write_card_section("atypical", tmp_path / "models")  # idempotent: one section
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.count(loso.CARD_BEGIN) == 1 and "| tbx11k | fold |" in card and "Pooled val" in card
    manifest = load_manifest(folder)  # sha256 still matches: the model file is unchanged
    assert manifest.metrics["loso"]["tbx11k (fold)"]["false_flags"]["rate"] == 0.1


def test_atypical_fold_refits_without_the_source(data_dir, tmp_path):
    from filmgate_training.detectors.atypical_build import fit_score

    config = load_config("atypical", {"data.max_train_films": 60, "run_dir": str(tmp_path / "a")})
    fc = loso.fold_config(config, "tbx11k")
    net, threshold, backbone = fit_score(fc)
    assert backbone.startswith("view ") and threshold > 0
    x = np.zeros((2, 1, 128, 128), np.float32)
    x[:, :, 10:-10, 10:-10] = 0.5  # a flat grey field: as atypical as it gets
    with torch.inference_mode():
        assert (net(torch.from_numpy(x)).numpy()[:, 0] >= threshold).all()
    row = loso.fold(config, "tbx11k", limit=4)
    assert row["mode"] == "fold" and row["films"] == 4 and row["false_flags"]["examples"] == 4
    assert row["model"].startswith(f"{config.version} fold: refit on view ")


def test_atypical_builds_through_all_and_has_no_fit_of_its_own(tmp_path, data_dir, capsys):
    """``all --config atypical`` fits, calibrates, exports, evaluates and ships (small smoke run on real films, the
    shipped view network copied as its backbone); ``fit --config atypical`` says what to run instead."""
    import shutil

    from filmgate_training.cli import main

    models = tmp_path / "models"
    shutil.copytree(REPO_MODELS / "view", models / "view")
    shutil.copytree(REPO_MODELS / "graph-view-atypical", models / "graph-view-atypical")  # view's manifest.graph
    sets = ["data.max_train_films=60", "data.max_val_films=12", f"run_dir={tmp_path / 'run'}",
            f"models_dir={models}", "train.threads=1", "evaluate.loso_target_fpr=null"]  # fmt: skip
    assert main(["all", "--config", "atypical", *(x for s in sets for x in ("--set", s))]) == 0
    manifest = load_manifest(models / "atypical")
    assert manifest.kind == "score" and manifest.extra["backbone"] == f"view {load_manifest(models / 'view').version}"
    report = json.loads((models / "atypical" / "evaluation.json").read_text())
    assert report["val"]["by_kind"]["frontal-chest"]["films"] == 12
    assert report["dicom"] and all("score" in d or "error" in d for d in report["dicom"])  # evaluate.dicom_survey
    assert "Which choices looked at val" in (models / "atypical" / "MODEL_CARD.md").read_text()
    run = tmp_path / "run"  # shipped through the framework's one install path: the evaluated files, unchanged
    for name in ("model.onnx", "evaluation.json", "evaluation.md"):
        assert (models / "atypical" / name).read_bytes() == (run / name).read_bytes()
    build = report["build"]  # the fit's record (run/build.json) with the export's parity
    assert build["sha256"] == manifest.sha256 and build["parity_max_abs_diff"] < 1e-2
    out = capsys.readouterr().out  # the framework's parity check (export.parity) ran on the exported file
    assert re.search(r"parity torch vs onnxruntime on \d+ inputs from \d+ real val films", out)
    assert main(["fit", "--config", "atypical"]) == 2
    assert "all --config atypical" in capsys.readouterr().err
    # the one manifest construction gives it the shipped model's keys (what the gate and the tests read)
    shipped = load_manifest(REPO_MODELS / "atypical")
    assert set(manifest.metrics) == set(shipped.metrics) - {"loso"} and set(manifest.extra) == set(shipped.extra)
    assert manifest.labels == shipped.labels == () and manifest.threshold == report["threshold"] == build["threshold"]
    card = (models / "atypical" / "MODEL_CARD.md").read_text()  # its templates, filled from the evaluation JSON
    assert "{" not in card.replace("{'", "") and f"**{manifest.threshold:.4f}**" in card
    assert f"Frontal chest films flagged: {report['val']['by_kind']['frontal-chest']['flagged']}/12" in card


def test_finish_builds_atypical_as_all_does_and_the_same_config_gives_the_same_model(tmp_path, data_dir):
    """``finish --config atypical`` is the same build (steps.build): on the same films it ships the same model."""
    import shutil

    from filmgate_training.cli import main
    from filmgate_training.detectors.finish import finish

    models = tmp_path / "models"
    shutil.copytree(REPO_MODELS / "view", models / "view")
    shutil.copytree(REPO_MODELS / "graph-view-atypical", models / "graph-view-atypical")  # view's manifest.graph
    sets = {"data.max_train_films": 40, "data.max_val_films": 6, "run_dir": str(tmp_path / "run"),
            "models_dir": str(models), "train.threads": 1, "evaluate.loso_target_fpr": None}  # fmt: skip
    cli = [x for k, v in sets.items() for x in ("--set", f"{k}={'null' if v is None else v}")]
    assert main(["all", "--config", "atypical", *cli]) == 0
    first = load_manifest(models / "atypical")
    (models / "atypical" / "model.onnx").unlink()
    finish("atypical", sets)
    again = load_manifest(models / "atypical")  # loads: the model file is back, with the sha256 it records
    assert again.sha256 == first.sha256 and again.threshold == first.threshold and again.created >= first.created
    assert json.loads((models / "atypical" / "evaluation.json").read_text())["model"]["sha256"] == first.sha256


def test_finish_writes_the_extra_evaluation_card_and_headline_of_a_pediatric_run(tmp_path, data_dir):
    """``finish`` after ``all`` (tiny pediatric run on real films): extra.md, the detector's own card with the
    config's card text, and the headline figures in the manifest, with the model file unchanged."""
    import yaml

    from filmgate.manifest import sha256_file
    from filmgate_training.detectors.finish import finish
    from filmgate_training.evaluate import evaluate as run_evaluation
    from filmgate_training.evaluate import onnx_runner, write_report
    from filmgate_training.export import export, ship
    from filmgate_training.train import fit

    d = json.loads(json.dumps(tiny_config(tmp_path, task="pediatric").to_dict()))  # tuples -> lists for YAML
    d["val_notes"], d["card_limits"] = ["None looked at val in this test."], ["A tiny test model."]
    path = tmp_path / "pediatric-tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    config = load_config(path)
    fit(config)
    export(config)
    onnx_path = config.run_path / "model.onnx"
    report = run_evaluation(config, onnx_runner(onnx_path), {"sha256": sha256_file(onnx_path)})
    write_report(report, config.run_path)
    folder = ship(config)
    sha = load_manifest(folder).sha256
    finish(str(path))
    manifest = load_manifest(folder)  # still loads: sha256 of the unchanged model file
    assert manifest.sha256 == sha and "shortcut_checks" in manifest.metrics["extra"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: `pediatric`") and "A tiny test model." in card
    assert "None looked at val in this test." in card and (folder / "extra.md").is_file()
    extra = json.loads((folder / "extra.json").read_text())  # the card's figures are the extra evaluation's
    spine = extra["spine_by_age"]
    assert f"{sum(r['right'] for r in spine)} of its {sum(r['films'] for r in spine)} val films right" in card
    assert manifest.metrics["extra"] == get_task("pediatric").headline(extra)


def test_the_pediatric_age_model_trains_on_intervals_ships_as_kind_age_and_is_cut_by_the_policy(tmp_path, data_dir):
    """The age variant of ``pediatric`` (task key ``pediatric-age``) through the one ship path on real films: its
    training targets are age intervals (a recorded age, the children's hospital's documented 1-6 years, 18 or more
    for adult collections), its exported model outputs years, its threshold is the policy's cut (never calibrated),
    it ships to ``models/pediatric`` as kind ``age``, ``finish`` writes the mean absolute error per age band, and
    the gate's policy cuts its estimate where it cuts the header's age."""
    import math

    import yaml

    from filmgate.config import Config, DetectorsConfig, PolicyConfig
    from filmgate.decode import decode_file
    from filmgate.detectors import DetectorSet, load_detector
    from filmgate.judge import Judge
    from filmgate.manifest import sha256_file
    from filmgate.policy import Metadata
    from filmgate_training.data import make_batch, training_pool
    from filmgate_training.detectors.finish import finish
    from filmgate_training.detectors.pediatric_age import U0, age_interval
    from filmgate_training.evaluate import evaluate as run_evaluation
    from filmgate_training.evaluate import onnx_runner, write_report
    from filmgate_training.export import export, ship
    from filmgate_training.films import all_rows
    from filmgate_training.train import fit

    task = get_task("pediatric-age")
    assert task.name == "pediatric" and task.kind == "age" and get_task("pediatric").kind == "classifier"
    rows = {r.source: r for r in all_rows(())}
    assert age_interval(rows["kermany"]) == (1.0, 6.0) and age_interval(rows["tbx11k"]) == (18.0, 120.0)
    aged = next(r for r in all_rows(()) if r.source == "nih-cxr14" and r.age is not None)
    assert age_interval(aged) == (aged.age, aged.age)

    d = json.loads(json.dumps(tiny_config(tmp_path, task="pediatric-age").to_dict()))
    d["val_notes"], d["card_limits"] = ["None looked at val in this test."], ["A tiny test model."]
    path = tmp_path / "pediatric-age-tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    config = load_config(path)
    train, _ = split_train(config, task)
    pool = training_pool(config, task, train)
    _, y = make_batch(pool, task, config, np.random.default_rng(0), 8)
    assert y.dtype == np.float32 and y.shape == (8, 2) and (y[:, 0] <= y[:, 1]).all()  # (low, high) - U0
    assert (np.expm1(y + U0) >= 0).all()
    fit(config)
    export(config)
    onnx_path = config.run_path / "model.onnx"
    report = run_evaluation(config, onnx_runner(onnx_path), {"sha256": sha256_file(onnx_path)})
    assert report["threshold"] == -10.0 and "fixed by the task" in report["threshold_rule"]
    write_report(report, config.run_path)
    folder = ship(config)
    assert folder.name == "pediatric"
    finish(str(path))
    manifest = load_manifest(folder)
    assert manifest.kind == "age" and manifest.threshold == 10.0 and manifest.reason == "pediatric"
    extra = json.loads((folder / "extra.json").read_text())
    bands = [r["band"] for r in extra["mae_by_band"]]
    assert "18-39" in bands and all(math.isfinite(r["mae"]) for r in extra["mae_by_band"])
    assert manifest.metrics["extra"] == task.headline(extra)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "Kind `age`" in card and "**under** the policy's cut" in card and "A tiny test model." in card

    # leave-one-source-out rows of an age model say where its estimates lie per class, in years
    row = loso.score_source(config, task, onnx_runner(folder / "model.onnx"), -10.0, "nih-cxr14", limit=3)
    p10, p50, p90 = row["years_p10_p50_p90"]["adult"]
    assert 0.0 <= p10 <= p50 <= p90 and row["false_flags"]["examples"] == 3

    # the gate: the finding's score is the age in years; the policy's cut decides, for the header and image alike
    det = load_detector(folder, manifest, DetectorsConfig(models_dir=str(folder.parent), provider="cpu"))
    film = next(f for f in all_rows(()) if f.source == "nih-cxr14" and f.split == "val")
    pixels = decode_file(film.path).pixels

    def judged_at(cut: float):  # the one judge, as the node, inspect and the sweep call it
        judge = Judge(dataclasses.replace(Config(), policy=PolicyConfig(pediatric_age_years=cut)), DetectorSet([det]))
        (judgement,) = judge.conclude([judge.examine_pixels(pixels, Metadata(modality="DX"))])
        return judgement

    (finding,) = judged_at(10.0).findings
    assert finding.below and finding.score >= 0.0
    for cut in (finding.score - 0.5, finding.score + 0.5):
        judged = judged_at(max(cut, 0.1)).decision
        assert (judged.reasons == ("pediatric",)) is (finding.score < max(cut, 0.1)), (finding.score, cut)


def test_short_folds_are_compared_with_full_length_folds_of_the_same_recipe_and_source():
    """The report puts a short fold beside the full-length fold of the same source and recipe, and says whether each
    figure lies inside the other's 95% interval (the issue allows short folds only where they agree)."""

    def row(steps, flagged, caught, rule=", margin threshold"):
        ff = {"role": "false flags", "examples": 400, "flagged": flagged, "rate": flagged / 400,
              "ci95": list(wilson_interval(flagged, 400))}  # fmt: skip
        ct = {"role": "caught", "examples": 200, "flagged": caught, "rate": caught / 200,
              "ci95": list(wilson_interval(caught, 200))}  # fmt: skip
        return {"source": "nih-cxr14", "mode": "fold", "model": f"1.0.0 fold: {steps} steps{rule}", "films": 600,
                "steps": steps, "classes": {"frontal-chest": ff, "not-radiograph": ct}, "false_flags": ff,
                "caught": ct}  # fmt: skip

    report = {"detector": "view", "rows": [row(400, 3, 199), row(1000, 2, 200), row(200, 30, 150, rule="")]}
    (pair,) = loso.short_vs_full(report)  # the fpr-rule fold is another recipe: nothing to compare it with
    assert (pair["short_steps"], pair["full_steps"], pair["agree"]) == (400, 1000, True)
    assert set(pair["figures"]) == {"frontal-chest (false flags)", "not-radiograph (caught)"}  # no pooled duplicates
    report["rows"].append(row(300, 40, 120))
    worse = [p for p in loso.short_vs_full(report) if p["short_steps"] == 300]
    assert worse and not worse[0]["agree"]
    assert "do not agree" in loso.markdown(report, None) and "| **no** |" in loso.markdown(report, None)
