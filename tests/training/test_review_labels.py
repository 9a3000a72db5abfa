"""The review console's corrections as a labelled source: rows for the task they concern join the training films
(uncapped, never val), a short fit runs on them, and a site fine-tune that is worse on val is not shipped."""

from __future__ import annotations

import csv
import json

import pytest

from filmgate_training.config import config_from_dict
from filmgate_training.data import split_train, training_pool, val_films
from filmgate_training.datasets import select
from filmgate_training.review import check_not_worse, read_labels, review_rows
from filmgate_training.tasks import get_task


def write_labels(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "sop_instance_uid", "detector", "label", "user", "labelled_at"])
        w.writeheader()
        for r in rows:
            w.writerow({"sop_instance_uid": "1.2.3", "user": "ann", "labelled_at": "2026-01-01T00:00:00Z", **r})


def test_console_labels_become_training_rows_for_their_detector(tmp_path, data_dir):
    films = [f.path for f in select(split="train", kind="frontal-chest", source="hannover")[:3]]
    csv_path = tmp_path / "labels.csv"
    write_labels(csv_path, [
        {"file": str(films[0]), "detector": "pediatric", "label": "adult"},
        {"file": str(films[1]), "detector": "pediatric", "label": "child"},
        {"file": str(films[2]), "detector": "orientation", "label": "upright"},
        {"file": str(films[2]), "detector": "orientation", "label": "rot90"},  # not usable by a synthetic task
        {"file": str(tmp_path / "expired.dcm"), "detector": "pediatric", "label": "adult"},  # bytes no longer kept
        {"file": str(films[2]), "detector": "view", "label": "lateral-chest"},
    ])  # fmt: skip
    src = [type("S", (), {"labels": str(csv_path), "source": "site-review", "licence": "site"})()]
    ped = get_task("pediatric")
    rows = review_rows(src, ped)
    assert [(r.path, ped.labels[ped.label_of(r)]) for r in rows] == [(films[0], "adult"), (films[1], "child")]
    assert [r.path for r in review_rows(src, get_task("orientation"))] == [films[2]]
    view = get_task("view")
    assert [view.labels[view.label_of(r)] for r in review_rows(src, view)] == ["lateral-chest"]
    with pytest.raises(ValueError, match="not a console labels CSV"):
        (tmp_path / "other.csv").write_text("a,b\n1,2\n")
        read_labels(str(tmp_path / "other.csv"))

    config = config_from_dict({"task": "pediatric", "data": {
        "cache_dir": str(tmp_path / "cache"), "max_train_films": 4, "max_val_films": 3, "calibration_fraction": 0.0,
        "review": [{"labels": str(csv_path), "source": "site-review"}]}})  # fmt: skip
    train, calib = split_train(config, ped)
    site = [f for f in train + calib if f.source == "site-review"]
    assert len(site) == 2  # kept although max_train_films caps the rest
    assert not any(f.source == "site-review" for f in val_films(config, ped))
    pool = training_pool(config, ped, site)
    assert len(pool.films) == 2 and "site-review" in pool.sources()


def test_a_worse_site_fine_tune_is_not_shipped(tmp_path):
    shipped = tmp_path / "pediatric"
    shipped.mkdir()
    old = {"val_films": 100, "accuracy": 0.95, "worst_source": {"source": "a", "accuracy": 0.9}}
    (shipped / "manifest.json").write_text(json.dumps({"metrics": old}))
    check_not_worse(shipped, {**old, "accuracy": 0.96})
    with pytest.raises(RuntimeError, match="worse on val"):
        check_not_worse(shipped, {**old, "accuracy": 0.94})
    with pytest.raises(RuntimeError, match="worst source"):
        check_not_worse(shipped, {**old, "worst_source": {"source": "a", "accuracy": 0.8}})
    with pytest.raises(RuntimeError, match="same val films"):
        check_not_worse(shipped, {**old, "val_films": 50})
    check_not_worse(tmp_path / "none-yet", old)
