"""Shared graphs: several shipped detectors computed in one ONNX graph, which the gate runs once per batch for all.

Some detectors compute the same network: ``atypical`` is a distance on the features of the ``view`` network, so with
a file each the gate computed view's network twice per film. A shared graph has one output per member (named after
it, the member's raw output as its own model gives it) and one input per preprocessing the members need; each
member's manifest names it (``manifest.graph``, :class:`filmgate.manifest.SharedGraph`) and the gate opens it once
(:mod:`filmgate.detectors`). The members' own model files stay: they are what each detector was evaluated as, and
the graph is checked against them.

:func:`build_graph` (``python -m filmgate_training graph``, and the ship step of every member, :func:`ship_graphs`):

1. the graph from the members' shipped models (the definition's ``build``, registered by a task with
   :func:`register_graph`), exported to ONNX;
2. parity: the graph (float) against each member's own float model on every val film of every kind as it came,
   batches of several and of one; refused when an output differs by more than the member's
   ``evaluate.parity_tolerance`` or a verdict changes;
3. its int8 copy (:func:`filmgate_training.quantize.quantize`), calibrated on the members' own calibration films
   (train split, the sources each trained on; never val), checked per member on held-out train films as every int8
   model is (:func:`filmgate_training.quantize.check_parity`);
4. the files go to ``models/graph-<name>/`` (``model.onnx``, ``model.int8.onnx``, ``graph.json``), the record into
   every member's manifest;
5. the evidence: each member's own float model against the graph's int8 output on val (every variant, every kind,
   synthetic wrong films) and on its card's leave-one-source-out sources (``compare(graph="int8")``), written to
   ``models/graph-<name>/int8-<member>.{json,md}``, into the member's card and its headline into the manifest.
   A graph whose int8 output is worse than the member's own model (the int8 criterion) is not shipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.manifest import ModelManifest, QuantizedModel, SharedGraph, load_manifest, sha256_file, write_manifest
from filmgate.preprocess import PreprocessSpec
from filmgate_training.card import put_section

GRAPH_FILE, INT8_FILE, RECORD = "model.onnx", "model.int8.onnx", "graph.json"
CARD_BEGIN = "<!-- graph:begin (python -m filmgate_training graph) -->"
CARD_END = "<!-- graph:end -->"
OPSET = 17


@dataclass(frozen=True)
class GraphDef:
    """A shared graph: ``members`` (its outputs, in order) and ``build``: models folder -> (a torch module whose
    forward takes the inputs in order and returns the members' outputs in order, {input name: preprocessing})."""

    name: str
    members: tuple[str, ...]
    build: Callable[[Path], tuple[Any, dict[str, PreprocessSpec]]]
    why: str = ""


GRAPHS: dict[str, GraphDef] = {}


def register_graph(graph: GraphDef) -> GraphDef:
    GRAPHS[graph.name] = graph
    return graph


def registered() -> Mapping[str, GraphDef]:
    from filmgate_training.tasks import registered as tasks

    tasks()  # the task modules register their graphs on import
    return GRAPHS


def folder_name(graph: GraphDef) -> str:
    return f"graph-{graph.name}"


def export_graph(model: Any, inputs: Mapping[str, PreprocessSpec], outputs: tuple[str, ...], path: Path) -> None:
    """The module to ONNX with the inputs and outputs named, every axis 0 dynamic (the gate's batches)."""
    import onnx
    import torch

    model.eval()
    dummy = tuple(torch.zeros(2, 1, s.size, s.size, dtype=torch.float32) for s in inputs.values())
    names = [*inputs, *outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated (and warns of traced shapes), correct
        torch.onnx.export(model, dummy, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n in names}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)  # fmt: skip
    onnx.checker.check_model(onnx.load(str(path)))


def _members(models_path: Path, graph: GraphDef) -> dict[str, tuple[Path, ModelManifest, Any, Any]]:
    from filmgate_training.quantize import shipped_config

    out = {}
    for name in graph.members:
        folder = models_path / name
        manifest, config, task = shipped_config(folder)
        out[name] = (folder, manifest, config, task)
    return out


def _specs(inputs: Mapping[str, PreprocessSpec], members: Mapping[str, Any]) -> tuple[PreprocessSpec, ...]:
    """Every preprocessing the graph and its members' own models are fed, in one order (prepare's channels)."""
    return tuple(dict.fromkeys([*inputs.values(), *(m[1].preprocessing for m in members.values())]))


class _Runner:
    """The members' own float models and a graph file on stacked inputs (:func:`filmgate_training.data.prepare`)."""

    def __init__(self, graph_file: Path, inputs: Mapping[str, PreprocessSpec], members: Mapping[str, Any],
                 specs: tuple[PreprocessSpec, ...], threads: int = 1) -> None:  # fmt: skip
        from filmgate.detectors import onnx_session

        self.graph = onnx_session(graph_file, provider="cpu", intra_op_threads=threads)
        self.own = {n: onnx_session(m[0] / m[1].file, provider="cpu", intra_op_threads=threads)
                    for n, m in members.items()}  # fmt: skip
        self.channel = {n: specs.index(m[1].preprocessing) for n, m in members.items()}
        self.feeds = {n: specs.index(s) for n, s in inputs.items()}
        self.names = list(members)

    def graph_outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {n: np.ascontiguousarray(x[:, j : j + 1], dtype=np.float32) for n, j in self.feeds.items()}
        return dict(zip(self.names, self.graph.run(self.names, feeds), strict=True))

    def own_output(self, name: str, x: np.ndarray) -> np.ndarray:
        j = self.channel[name]
        return self.own[name].run(["output"], {"image": np.ascontiguousarray(x[:, j : j + 1], dtype=np.float32)})[0]


def _val_inputs(specs: tuple[PreprocessSpec, ...], limit: int | None) -> np.ndarray:
    """Every val film of every kind as it came (``limit``: a cap per kind, for smoke runs), stacked inputs."""
    from filmgate.decode import DecodeError, decode_file
    from filmgate_training.data import cap, prepare
    from filmgate_training.datasets import select

    films = sorted(select(split="val"), key=lambda f: str(f.path))
    films = [f for kind in sorted({f.kind for f in films}) for f in cap([f for f in films if f.kind == kind], limit)]
    xs = []
    for film in films:
        try:
            xs.append(prepare(decode_file(film.path).pixels, specs))
        except DecodeError:
            continue
    return np.stack(xs).astype(np.float32)


def fp32_parity(runner: _Runner, members: Mapping[str, Any], x: np.ndarray) -> dict[str, Any]:
    """The float graph against each member's own float model on the same films: largest output difference (relative
    to the largest output above 1, for a score or an age), verdicts and classes changed; batches of 64 and of 1."""
    out: dict[str, Any] = {}
    chunks = [runner.graph_outputs(x[i : i + 64]) for i in range(0, len(x), 64)]
    single = [runner.graph_outputs(x[i : i + 1]) for i in range(min(len(x), 64))]
    for name, (_, manifest, config, task) in members.items():
        own = np.concatenate([runner.own_output(name, x[i : i + 64]) for i in range(0, len(x), 64)])
        mine = np.concatenate([c[name] for c in chunks])
        one = np.concatenate([c[name] for c in single])
        diff = max(float(np.abs(own - mine).max()), float(np.abs(own[: len(one)] - one).max()))
        scale = max(1.0, float(np.abs(own).max())) if task.kind in ("score", "age") else 1.0
        fa, fb = manifest.flagged(manifest.scores(own)), manifest.flagged(manifest.scores(mine))
        row = {"films": int(len(x)), "split": "val, every film of every kind as it came", "max_abs_diff": diff,
               "tolerance": config.evaluate.parity_tolerance * scale, "verdicts_changed": int((fa != fb).sum())}
        if manifest.kind == "classifier":
            row["classes_changed"] = int((own.argmax(1) != mine.argmax(1)).sum())
        out[name] = row
        print(f"graph fp32 vs {name}'s own model on {len(x)} val films: max |diff| {diff:.3g} (tolerance "
              f"{row['tolerance']:.3g}), {row['verdicts_changed']} verdicts changed")  # fmt: skip
        if not diff <= row["tolerance"] or row["verdicts_changed"] or row.get("classes_changed"):
            raise RuntimeError(f"graph parity failed for {name}: {row}")
    return out


def build_graph(models_path: Path, graph: GraphDef, threads: int = 1, val_limit: int | None = None,
                compare: bool = True, loso_limit: int | None = None) -> Path:  # fmt: skip
    """Build, check and install the shared graph (see the module's docstring); returns its folder."""
    from filmgate_training.quantize import (
        agreement,
        calibration_films,
        check_parity,
        examples,
        parity_films,
        quantize,
    )

    t0 = time.perf_counter()
    members = _members(models_path, graph)
    model, inputs = graph.build(models_path)
    specs = _specs(inputs, members)
    folder = models_path / folder_name(graph)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        fp32, int8 = Path(tmp) / GRAPH_FILE, Path(tmp) / INT8_FILE
        export_graph(model, inputs, graph.members, fp32)
        runner = _Runner(fp32, inputs, members, specs, threads)
        parity = fp32_parity(runner, members, _val_inputs(specs, val_limit))

        cal, sources = [], {}
        for name, (_, manifest, config, task) in members.items():
            films = calibration_films(manifest, config, task)
            cal.append(examples(films, task, config, specs)[0])
            sources[name] = len(films)
        x_cal = np.concatenate(cal)
        how = quantize(fp32, int8, {n: x_cal[:, j : j + 1] for n, j in runner.feeds.items()}, one_batch=True)
        how |= {"calibration_split": "train (each member's films trained on; not the threshold's held-out patients, "
                "never val)", "calibration_films": sources}  # fmt: skip
        q_runner = _Runner(int8, inputs, members, specs, threads)
        held_out = {}
        for name, (_, manifest, config, task) in members.items():
            films = parity_films(manifest, config, task)
            x, y, _ = examples(films, task, config, specs)
            a = np.concatenate([q_runner.own_output(name, x[i : i + 64]) for i in range(0, len(x), 64)])
            b = np.concatenate([q_runner.graph_outputs(x[i : i + 64])[name] for i in range(0, len(x), 64)])
            result = agreement(manifest, task, a, b, y) | {
                "films": len(films), "split": "train patients held out of training (the threshold's films)",
                "threshold": manifest.threshold}  # fmt: skip
            print(f"graph int8 vs {name}'s own model on {result['examples']} examples of held-out train films: "
                  f"{result['verdicts_changed']} verdicts changed, max |score diff| {result['max_score_diff']:.4f}")
            check_parity(result)
            held_out[name] = result
        os.replace(fp32, folder / GRAPH_FILE)
        os.replace(int8, folder / INT8_FILE)
    how["seconds"] = round(time.perf_counter() - t0, 1)
    how["created"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digests = {n: m[1].sha256 for n, m in members.items()}
    graph_sha, int8_sha = sha256_file(folder / GRAPH_FILE), sha256_file(folder / INT8_FILE)
    record: dict[str, Any] = {"name": graph.name, "why": graph.why, "members": digests, "outputs": list(graph.members),
              "inputs": {n: s.to_dict() for n, s in inputs.items()}, "file": GRAPH_FILE,
              "sha256": graph_sha, "int8": INT8_FILE, "int8_sha256": int8_sha, "quantization": how,
              "fp32_parity": parity,
              "int8_held_out_train": held_out}  # fmt: skip
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    rel = folder_name(graph)
    for name, (mfolder, manifest, _, _) in members.items():
        q = QuantizedModel(file=f"{rel}/{INT8_FILE}", sha256=int8_sha, quantization=how,
                           parity={"held_out_train": held_out[name]})  # fmt: skip
        g = SharedGraph(file=f"{rel}/{GRAPH_FILE}", sha256=graph_sha, output_name=name, inputs=inputs,
                        members=digests, quantized=q, parity=parity[name])  # fmt: skip
        write_manifest(mfolder, dataclasses.replace(manifest, graph=g))
        load_manifest(mfolder)  # what the gate will do: schema, sha256 of every file, built from this model
    if compare:
        compare_members(models_path, graph, threads, loso_limit, val_limit)
    return folder


def compare_members(models_path: Path, graph: GraphDef, threads: int = 1, loso_limit: int | None = None,
                    val_limit: int | None = None) -> None:  # fmt: skip
    """Each member's own float model against the graph's int8 output (what the gate runs on CPU) on val and the
    card's leave-one-source-out sources: reports beside the graph, the section in the card, the headline in the
    manifest. Raises when a member's is worse (the int8 criterion)."""
    from filmgate_training import quantize

    folder = models_path / folder_name(graph)
    worse = []
    for name in graph.members:
        mfolder = models_path / name
        r = quantize.compare(mfolder, threads, loso_limit, graph="int8", val_limit=val_limit)
        from filmgate_training.evaluate import _jsonable

        (folder / f"int8-{name}.json").write_text(json.dumps(_jsonable(r), indent=2) + "\n")
        (folder / f"int8-{name}.md").write_text(
            f"# Shared graph `{graph.name}` (int8) against `{name}`'s own float model\n\n"
            + quantize.markdown(r).split("\n", 2)[2]
        )
        manifest = load_manifest(mfolder)
        g = manifest.graph
        assert g is not None and g.quantized is not None
        if g.quantized.sha256 != r["int8"]["sha256"] or manifest.sha256 != r["fp32"]["sha256"]:
            raise RuntimeError(f"{mfolder}: the comparison was made with other files; run it again")
        section = quantize.markdown(r, full=False).replace(
            "Per source of val and every kind of film: [int8.md](int8.md) (int8.json).",
            f"Per source of val and every kind of film: [../{folder.name}/int8-{name}.md](../{folder.name}/int8-"
            f"{name}.md).",
        )
        put_section(mfolder / manifest.card, CARD_BEGIN, CARD_END, section)
        parity = {"held_out_train": g.quantized.parity.get("held_out_train", {})} | quantize.headline(r)
        q = dataclasses.replace(g.quantized, parity=parity)
        write_manifest(mfolder, dataclasses.replace(manifest, graph=dataclasses.replace(g, quantized=q)))
        load_manifest(mfolder)
        if not r["not_worse"]:
            worse.append(name)
    if worse:
        raise RuntimeError(f"graph {graph.name}: the int8 graph is worse than the own model of {worse} (int8 "
                           "criterion); not shipped")  # fmt: skip


def drop_graph(models_path: Path, graph: GraphDef, why: str) -> None:
    """The graph's record out of every member's manifest and card, its folder removed: each member runs its own
    model file again."""
    for name in graph.members:
        mfolder = models_path / name
        if not (mfolder / "manifest.json").is_file():
            continue
        manifest = _manifest_unchecked(mfolder)
        if manifest.graph is not None:
            write_manifest(mfolder, dataclasses.replace(manifest, graph=None))
        card = mfolder / manifest.card
        if card.is_file() and CARD_BEGIN in card.read_text():
            head, rest = card.read_text().split(CARD_BEGIN, 1)
            card.write_text(head.rstrip("\n") + "\n" + rest.split(CARD_END, 1)[1].lstrip("\n"))
    shutil.rmtree(models_path / folder_name(graph), ignore_errors=True)
    print(f"graph {graph.name} not shipped: {why}")


def _manifest_unchecked(folder: Path) -> ModelManifest:
    """A manifest as written, without checking its files (a stale graph record must not stop it being removed)."""
    return ModelManifest.from_dict(json.loads((folder / "manifest.json").read_text()))


def ship_graphs(models_path: Path, task_name: str, limit: int | None = None) -> None:
    """The graph step of the one ship path (``export.install``): every registered graph with ``task_name`` among its
    members is rebuilt from the members now shipped, or, when it cannot be (a member missing, built on another
    model of another member, parity or the criterion failing), dropped so that each member runs its own model.
    ``limit``: at most this many val films per kind and films per held-out source in its checks (the shipping
    run's ``data.max_val_films``: a smoke run's)."""
    for graph in registered().values():
        if task_name not in graph.members:
            continue
        missing = [m for m in graph.members if not (models_path / m / "manifest.json").is_file()]
        if missing:
            drop_graph(models_path, graph, f"members {missing} are not shipped")
            continue
        try:
            print(f"built {build_graph(models_path, graph, val_limit=limit, loso_limit=limit)}")
        except (RuntimeError, ValueError, FileNotFoundError) as exc:
            drop_graph(models_path, graph, str(exc))
