"""Detector plug-ins: every task lives in its own module under training/detectors/, is found without a list, and owns
its hooks (extra evaluation and its report, manifest headline, card text filled from the evaluation JSON)."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import filmgate_training.detectors as detectors
from filmgate_training.config import config_from_dict
from filmgate_training.detectors.extra_eval import markdown
from filmgate_training.evaluate import write_report
from filmgate_training.tasks import get_task, registered
from tests.helpers import REPO


def test_every_detector_module_registers_its_task_and_is_found_without_a_list():
    tasks = registered()
    names = [m.name for m in pkgutil.iter_modules(detectors.__path__)]
    modules = [importlib.import_module(f"{detectors.__name__}.{name}") for name in names]
    own = [m.TASK for m in modules if hasattr(m, "TASK")]
    # keys: the configs' ``task:``; pediatric has two variants of one detector (classifier, age), shipped as one
    assert set(tasks) == {"orientation", "inversion", "flip", "view", "pediatric", "pediatric-age", "atypical"}
    assert sorted(t.name for t in own) == sorted(t.name for t in tasks.values())
    assert all(any(t is task for task in tasks.values()) for t in own)
    assert tasks["pediatric"].kind == "classifier" and tasks["pediatric-age"].kind == "age"
    assert "import" not in Path(detectors.__file__).read_text().split('"""')[-1]  # no hand-kept import list


SHIPPED = REPO / "models"
EXTRA_TASKS = ("view", "flip", "pediatric")


def _shipped(name: str) -> tuple[dict, dict]:
    folder = SHIPPED / name
    return json.loads((folder / "evaluation.json").read_text()), json.loads((folder / "extra.json").read_text())


def _shipped_task(name: str):
    """The task the shipped model was trained as (its config's ``task:``: pediatric may be either variant)."""
    return get_task(json.loads((SHIPPED / name / "manifest.json").read_text())["extra"]["config"]["task"])


@pytest.mark.parametrize("name", EXTRA_TASKS)
def test_each_task_owns_its_extra_report_and_headline_and_they_reproduce_the_shipped_ones(name):
    """The task's hooks turn the shipped extra.json into the shipped extra.md and the manifest's metrics.extra."""
    task = _shipped_task(name)
    _, extra = _shipped(name)
    assert markdown(task, extra) == (SHIPPED / name / "extra.md").read_text()
    assert task.headline(extra) == json.loads((SHIPPED / name / "manifest.json").read_text())["metrics"]["extra"]
    assert get_task("orientation").extra_evaluation(None, None, 0.5) is None  # the framework's tasks have none


@pytest.mark.parametrize("name", EXTRA_TASKS)
def test_card_text_is_filled_from_the_shipped_evaluation_json(name):
    """Every template of the task's card fills from the shipped JSON (no figure in prose, no placeholder left)."""
    task = _shipped_task(name)
    report, extra = _shipped(name)
    config = config_from_dict(json.loads((SHIPPED / name / "manifest.json").read_text())["extra"]["config"])
    figures = task.card_figures(config, report, extra)
    assert task.card is not None
    for text in (task.card.purpose, task.card.data, task.card.measured, *task.card.limits):
        filled = task.card.fill(text, figures)
        assert "{" not in filled and "}" not in filled
    card = (SHIPPED / name / "MODEL_CARD.md").read_text()
    if name == "view":  # the figures are the shipped card's (11/11 val laterals, lower bound 76%, 224 and 73 films)
        assert task.card.fill(task.card.measured, figures) in card
    if name == "pediatric" and task.kind == "classifier":
        spine = extra["spine_by_age"]
        right, films = sum(r["right"] for r in spine), sum(r["films"] for r in spine)
        assert f"{right} of its {films} val films right" in task.card.fill(task.card.limits[-1], figures)
    if name == "flip":
        worst = min(extra["per_source"].items(), key=lambda kv: kv[1]["accuracy"])
        assert f"{worst[0]} {worst[1]['accuracy']:.1%}" in task.card.fill(task.card.limits[0], figures)


@pytest.mark.parametrize("name", ["orientation", "inversion", "flip", "view", "pediatric", "atypical"])
def test_one_report_writer_reproduces_every_shipped_evaluation_report(name, tmp_path):
    """``evaluate.write_report`` (the task's own Markdown, e.g. atypical's, or the framework's) turns each shipped
    evaluation.json into the shipped evaluation.md."""
    report = json.loads((SHIPPED / name / "evaluation.json").read_text())
    js, md = write_report(report, tmp_path)
    assert md.read_text() == (SHIPPED / name / "evaluation.md").read_text()
    assert json.loads(js.read_text()) == report


def test_atypical_card_is_filled_from_its_shipped_evaluation_json_and_config():
    """The atypical card's figures come from evaluation.json and the shipped config: its data and evaluation lines
    are the shipped card's, and the source balance is the config's (the prose once said n^0.5 after it became 0.25)."""
    from filmgate.manifest import load_manifest
    from filmgate_training.detectors.cards import score_card

    manifest = load_manifest(SHIPPED / "atypical")
    config = config_from_dict(manifest.extra["config"])
    card = score_card(config, manifest, json.loads((SHIPPED / "atypical" / "evaluation.json").read_text()))
    shipped = (SHIPPED / "atypical" / "MODEL_CARD.md").read_text()
    assert f"sources balanced as n^{config.data.source_balance:g})" in card
    lines = [x for x in card.splitlines() if x.startswith(("Fitted on", "- Frontal chest films flagged", "- Also"))]
    assert len(lines) == 3 and all(x in shipped for x in lines)
