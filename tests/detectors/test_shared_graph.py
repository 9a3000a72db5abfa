"""Detectors computed in one shared graph (``manifest.graph``): view and atypical, whose network contains view's.

The gate opens the graph once and runs it once per batch for both (``DetectorSet.sessions``); the findings must be
the ones each detector's own model gives, on real val films (float graph against float models: the same function;
int8 graph against the int8 models the gate ran before: the same verdicts). The manifest field is checked as the
gate loads it: files inside the models folder with their sha256, built from the very models installed, inputs and
outputs as the graph declares them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from filmgate.config import DetectorsConfig, parse_config
from filmgate.detectors import DetectorSet
from filmgate.judge import Judge
from filmgate.manifest import ManifestError, load_manifest, sha256_file
from filmgate.preprocess import fit_square, normalize
from filmgate_training.datasets import select
from tests.helpers import MODELS, assert_same_parity, pixels

MEMBERS = ("view", "atypical")
GRAPH = "graph-view-atypical"


def detector_set(models=MODELS, **detectors) -> DetectorSet:
    return DetectorSet.load(DetectorsConfig(models_dir=str(models), provider="cpu", **detectors))


def val_films(n_frontal: int = 60) -> list[np.ndarray]:
    """Real val films: frontal ones evenly spaced and every tenth film of the other kinds, and the frontal films
    with an all-black edge row or column inside the film (atypical's rebuilt input differs from the gate's there:
    the graph's second pass)."""
    frontal = sorted(select(split="val", kind="frontal-chest"), key=lambda f: str(f.path))
    others = sorted((f for f in select(split="val") if f.kind != "frontal-chest"), key=lambda f: str(f.path))
    films = frontal[:: len(frontal) // n_frontal][:n_frontal] + others[::10]
    return [pixels(f) for f in films] + black_edged(frontal[1::7], 6)


def black_edged(films, n: int) -> list[np.ndarray]:
    out = []
    for film in films:
        px = pixels(film)
        square, mask = fit_square(px, 128, "letterbox")
        unit = normalize(square, mask, "unit")
        real = np.ones_like(unit, bool) if mask is None else mask
        rows = [r for r in range(128) if real[r].any() and not (unit[r][real[r]] > 0).any()]
        cols = [c for c in range(128) if real[:, c].any() and not (unit[:, c][real[:, c]] > 0).any()]
        if rows or cols:
            out.append(px)
        if len(out) == n:
            break
    assert len(out) == n, "no val film with an all-black edge inside the film"
    return out


def findings(dets: DetectorSet, images: list[np.ndarray], batch: int = 16) -> dict[str, list]:
    judge = Judge(parse_config({}), dets)
    out: dict[str, list] = {name: [] for name in MEMBERS}
    for i in range(0, len(images), batch):
        for judged in judge.conclude([judge.examine_pixels(p) for p in images[i : i + batch]]):
            for f in judged.findings:
                if f.detector in out:
                    out[f.detector].append(f)
    return out


def test_view_and_atypical_are_computed_in_one_session_run():
    dets = detector_set()
    by_name = {d.name: d for d in dets.detectors}
    assert by_name["view"].session is by_name["atypical"].session
    assert by_name["view"].graph == by_name["atypical"].graph == f"{GRAPH}/model.onnx"
    assert {d["precision"] for d in dets.describe() if d["name"] in MEMBERS} == {"int8"}
    assert len(dets.sessions) == len(dets.detectors) - 1  # six detectors, five session.run per batch
    alone = detector_set(shared_graphs=False)
    assert len({id(d.session) for d in alone.detectors}) == len(alone.detectors)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_shared_graph_gives_the_findings_of_the_separate_models_on_real_val_films(precision):
    """fp32: the graph against each detector's own float model, the same function (scores to float precision);
    auto (int8 on CPU): the int8 graph gives the verdicts and classes of the int8 models the gate ran before, its
    scores within test_shipped_int8's tolerance of the own float model (the two int8 copies each stray from the float
    model a little, not alike)."""
    images = val_films()
    shared = findings(detector_set(precision=precision), images)
    alone = findings(detector_set(precision=precision, shared_graphs=False), images)
    reference = alone if precision == "fp32" else findings(detector_set(precision="fp32", shared_graphs=False), images)
    tolerance = {"fp32": 1e-4, "auto": 0.1}[precision]
    for name in MEMBERS:
        a, b = alone[name], shared[name]
        assert len(a) == len(b) == len(images)
        assert [f.flagged for f in a] == [f.flagged for f in b], f"{name}: verdicts differ"
        assert [f.predicted for f in a] == [f.predicted for f in b], f"{name}: classes differ"
        # a distance (atypical) relative to itself above 1, as the export's parity check bounds it: int8 moves the
        # scores of films far out (2.8 for a threshold of 1.37) by more than those near the threshold
        diff = max(abs(x.score - y.score) / max(1.0, abs(x.score) if x.reason == "atypical" else 1.0)
                   for x, y in zip(reference[name], b, strict=True))  # fmt: skip
        assert diff <= tolerance, f"{name}: largest score difference {diff:.3g}"


def test_batch_of_one_and_batch_of_many_agree_on_films_run_twice():
    """The graph runs again only the films whose rebuilt input differs (a batch-dependent shape inside the graph):
    a batch mixing both kinds gives each film what it gets alone."""
    images = val_films(8)
    dets = detector_set(precision="fp32")
    one, many = findings(dets, images, batch=1), findings(dets, images, batch=len(images))
    for name in MEMBERS:
        assert np.allclose([f.score for f in one[name]], [f.score for f in many[name]], atol=1e-5)


def test_the_shipped_graph_record():
    """Every member names the same graph, built from its very model file; float graph checked against the members'
    own models on val, int8 calibrated on train films and not worse on val and the leave-one-source-out sources."""
    records = {name: load_manifest(MODELS / name) for name in MEMBERS}  # checks every sha256
    graphs = {name: m.graph for name, m in records.items()}
    assert all(g is not None for g in graphs.values())
    first = graphs["view"]
    assert first is not None and first.quantized is not None
    assert first.members == {name: m.sha256 for name, m in records.items()}
    assert first.sha256 == sha256_file(MODELS / first.file)
    assert first.quantized.quantization["from_sha256"] == first.sha256
    assert first.quantized.quantization["calibration_split"].startswith("train")
    for name, g in graphs.items():
        assert g is not None and g.quantized is not None
        assert g.output_name == name and g.sha256 == first.sha256 and g.inputs == first.inputs
        assert g.parity["verdicts_changed"] == 0 and g.parity["max_abs_diff"] <= g.parity["tolerance"]
        assert g.parity["films"] >= 2000  # every val film of every kind
        p = g.quantized.parity
        assert p["not_worse"], f"{name}: the int8 graph is worse than its own model ({p['criterion']})"
        assert p["val"]["verdicts_changed"] == 0
        assert set(p["loso"]) == {k.split(" (")[0] for k in records[name].metrics.get("loso", {})}
        assert all(m["verdicts_changed"] == 0 for row in p["loso"].values() for m in row.values())


# ------------------------------------------------------------------------------ the manifest field, as loaded


@pytest.fixture
def models(tmp_path):
    out = tmp_path / "models"
    for name in (*MEMBERS, GRAPH):
        shutil.copytree(MODELS / name, out / name)
    return out


def edit(folder, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data["graph"])
    path.write_text(json.dumps(data))


def test_a_graph_path_outside_the_models_folder_is_refused(models):
    edit(models / "view", lambda g: g.update(file="../elsewhere/model.onnx"))
    with pytest.raises(ManifestError, match="inside the models folder"):
        load_manifest(models / "view")


def test_a_changed_graph_file_is_refused(models):
    path = models / GRAPH / "model.int8.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256 of graph file"):
        load_manifest(models / "atypical")


def test_a_graph_built_from_another_model_is_refused(models):
    edit(models / "view", lambda g: g["members"].update(view="0" * 64))
    with pytest.raises(ManifestError, match="built from another"):
        load_manifest(models / "view")
    edit(models / "view", lambda g: g["members"].pop("view"))
    with pytest.raises(ManifestError, match="does not name this detector"):
        load_manifest(models / "view")


def test_members_that_describe_the_graph_differently_are_refused(models):
    edit(models / "atypical", lambda g: g["members"].update(view="0" * 64))
    with pytest.raises(ManifestError, match="describe it differently|built from another"):
        detector_set(models)


def test_an_output_or_input_the_graph_does_not_have_is_refused(models):
    edit(models / "view", lambda g: g.update(output_name="lateral"))
    with pytest.raises(ManifestError, match="output 'lateral'"):
        detector_set(models)
    edit(models / "view", lambda g: g.update(output_name="view", inputs={"image": g["inputs"]["image"]}))
    with pytest.raises(ManifestError, match="declares inputs"):
        detector_set(models)


def test_a_dropped_graph_leaves_each_member_its_own_model(models):
    """What the ship step does when a graph cannot be rebuilt (a member retrained alone): the records and the
    folder go, and the gate runs each member's own file."""
    from filmgate_training.graph import CARD_BEGIN, drop_graph, registered

    drop_graph(models, registered()["view-atypical"], "test")
    assert not (models / GRAPH).exists()
    for name in MEMBERS:
        m = load_manifest(models / name)
        assert m.graph is None and CARD_BEGIN not in (models / name / m.card).read_text()
        assert dataclasses.replace(m, graph=None) == m
    dets = detector_set(models)
    assert len({id(d.session) for d in dets.detectors}) == 2 and not any(d.graph for d in dets.detectors)


def test_the_shipped_graph_is_what_the_graph_step_makes(models):
    """``python -m filmgate_training graph`` (the ship step of view and atypical), run again on the shipped models,
    makes both shipped graph files byte for byte (the float graph from the two own models, the int8 copy from the
    same train calibration films), with the same held-out parity figures."""
    from filmgate_training.graph import build_graph, registered

    shipped = {name: load_manifest(MODELS / name).graph for name in MEMBERS}
    shutil.rmtree(models / GRAPH)
    for name in MEMBERS:  # as a member ships: its own manifest, no graph record yet
        path = models / name / "manifest.json"
        data = json.loads(path.read_text())
        data.pop("graph")
        path.write_text(json.dumps(data))
    build_graph(models, registered()["view-atypical"], val_limit=10, compare=False)
    for name in MEMBERS:
        made, was = load_manifest(models / name).graph, shipped[name]
        assert made is not None and was is not None and made.quantized is not None and was.quantized is not None
        assert (made.sha256, made.quantized.sha256) == (was.sha256, was.quantized.sha256)
        assert_same_parity(made.quantized.parity["held_out_train"], was.quantized.parity["held_out_train"])
