"""int8 copies of the shipped detectors for the CPU, made and checked in one step that every shipped model goes through.

Six detectors at fp32 cost about 5 ms per film on one core; int8 (onnxruntime's static quantisation) about 2. The
float model stays the reference (what training evaluated, what CUDA runs); the int8 file is written beside it and
named in the manifest's ``quantized`` record, which the gate runs on CPU (``ModelManifest.file_for``).

:func:`quantize_folder` (``python -m filmgate_training quantize --config NAME``):

1. calibration: the task's own *train* films that it trained on (never val, nor the films held out for the
   threshold), evenly over sources (:func:`filmgate_training.data.cap`), in every variant the task evaluates (for
   orientation: as they came and turned 90/180/270), through decode + preprocess as the gate feeds the model;
2. quantisation: QDQ format (QuantizeLinear/DequantizeLinear around float ops, which onnxruntime's CPU provider fuses
   into integer kernels and which other providers can still read), int8 weights per output channel, uint8
   activations per tensor, percentile ranges, after onnxruntime's own pre-processing (shape inference, folding);
   MatMul and the first and last layer stay float (see :func:`quantize`);
3. parity: int8 against fp32 on real films it was not calibrated on (the train patients held out for the threshold,
   every variant): verdicts at the manifest's threshold, score differences, arg-max agreement; it fails when more
   than ``MAX_CHANGED`` of the verdicts change or the clean examples flagged grow by more than one;
4. the file, its sha256, how it was made and the parity figures go into ``manifest.quantized``; the folder is
   loaded back as the gate loads it.

:func:`compare` (``--compare``) is the evidence for the card: fp32 and int8 on the same films, the whole val split in
every variant, every val film of every kind as it came, synthetic wrong films, and every source of the card's
leave-one-source-out table, each with 95% Wilson intervals (``models/<task>/int8.{json,md}``; ``--card`` writes the
section into the model card and its headline into the manifest).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.manifest import ModelManifest, QuantizedModel, load_manifest, sha256_file, write_manifest
from filmgate_training.card import put_section
from filmgate_training.config import Config, config_from_dict
from filmgate_training.data import cap, eval_items, split_train, val_films
from filmgate_training.datasets import LabelledFilm, select
from filmgate_training.metrics import wilson_interval
from filmgate_training.tasks import Task, get_task

INT8_FILE = "model.int8.onnx"
CALIBRATION_FILMS = 96  # train films; with every variant a few hundred examples, MinMax needs no more
PARITY_FILMS = 160  # held-out train films
FLOAT_OPS = ("MatMul",)  # op types left in float32 (see quantize)
MAX_CHANGED = 0.005  # of the parity examples whose verdict may change (one always may: a film on the threshold)
CARD_BEGIN = "<!-- int8:begin (python -m filmgate_training quantize --compare --card) -->"
CARD_END = "<!-- int8:end -->"


def shipped_config(folder: Path) -> tuple[ModelManifest, Config, Task]:
    """The shipped detector's manifest, the config it was trained with (``extra.config``) fed as the gate feeds it
    (the manifest's preprocessing), and its task."""
    manifest = load_manifest(folder)
    config = config_from_dict(manifest.extra["config"])
    config = dataclasses.replace(config, preprocessing=manifest.preprocessing)
    return manifest, config, get_task(config.task)


def examples(films: Sequence[LabelledFilm], task: Task, config: Config, spec: Any = None
             ) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """Every variant of every film through the serving path: inputs (N, 1, S, S), labels, sources (``spec``:
    several specs, stacked as channels, :func:`filmgate_training.data.prepare`; default the config's)."""
    xs, ys, src = [], [], []
    for item in eval_items(films, task, config.preprocessing if spec is None else spec):
        if isinstance(item, tuple):
            continue
        xs.append(item.input)
        ys.append(item.label)
        src.append(item.film.source)
    if not xs:
        raise RuntimeError(f"{task.name}: no film could be decoded")
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64), src


def trained_sources(manifest: ModelManifest) -> set[str]:
    """The sources the float model trained on (its manifest's training data): hospitals added to ../shared/data
    since are the leave-one-source-out figures' held-out sources, and must not calibrate its int8 copy either."""
    return {row["source"] for row in manifest.training_data}


def calibration_films(manifest: ModelManifest, config: Config, task: Task, n: int = CALIBRATION_FILMS
                      ) -> list[LabelledFilm]:  # fmt: skip
    """Train films of the sources the model trained on (not the threshold's held-out patients, never val), evenly
    over sources."""
    trained, _ = split_train(config, task)
    sources = trained_sources(manifest)
    return cap([f for f in trained if f.source in sources], n)


def parity_films(manifest: ModelManifest, config: Config, task: Task, n: int = PARITY_FILMS) -> list[LabelledFilm]:
    """Train patients of its sources held out of training (the threshold's films): real films the quantiser never
    saw."""
    _, held_out = split_train(config, task)
    sources = trained_sources(manifest)
    return cap([f for f in held_out if f.source in sources], n)


def quantize(fp32: Path, out: Path, calibration: np.ndarray | Mapping[str, np.ndarray], input_name: str = "image",
             one_batch: bool = False) -> dict[str, Any]:  # fmt: skip
    """Static QDQ quantisation of ``fp32`` into ``out``, ranges from ``calibration`` (N, 1, S, S), or one such
    array per input of a graph with several (a shared graph's); returns how. ``one_batch``: every example in one
    calibration batch, for a graph whose inner tensors' batch size depends on the films (the shared view-atypical
    graph runs some films twice), which the percentile calibrater cannot stack across batches."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Batches of one size: onnxruntime's percentile calibrater stacks each batch's outputs and fails on a short last
    # batch. 16 when the examples divide by it (the shipped runs: 96 films), else the largest size below that does.
    feeds = {input_name: calibration} if isinstance(calibration, np.ndarray) else dict(calibration)
    count = len(next(iter(feeds.values())))
    size = count if one_batch else next(n for n in range(16, 0, -1) if count % n == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, count, size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    import onnx
    from onnxruntime.quantization.registry import QDQRegistry

    # Left in float32, chosen on held-out train films (never val), each change making scores follow the float
    # model more closely at no cost in speed: MatMul (in these graphs the atypical score's whitening, a Mahalanobis
    # distance over unbounded features, not a learned layer: quantised, its score moved by up to 0.52 against a
    # threshold of 1.37; float, by 0.02), and the first and last layer (the usual sensitive ones: flip's largest
    # score difference 0.083 -> 0.036). Percentile ranges (99.999%) rather than MinMax halved it again (0.027).
    ops = sorted(op for op in QDQRegistry if op not in FLOAT_OPS)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        edges = edge_layers(onnx.load(str(prepared)))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile, op_types_to_quantize=ops,
                        nodes_to_exclude=edges)  # fmt: skip
    onnx.checker.check_model(onnx.load(str(out)))
    return {
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, per output channel",
        "activations": "uint8, per tensor",
        "calibration": "Percentile 99.999",
        "float_ops": list(FLOAT_OPS),
        "float_layers": edges,
        "calibration_examples": int(count),
        **({"calibration_batch": int(count)} if one_batch else {}),
        "from_sha256": sha256_file(fp32),
    }


LAYERS = ("Conv", "Gemm", "MatMul")


def edge_layers(model: Any) -> list[str]:
    """The first layer of the graph and the last before each output (a graph with several outputs, a shared
    graph's, has a last layer per output): the ones left in float (see :func:`quantize`)."""
    nodes = list(model.graph.node)
    layers = [n.name for n in nodes if n.op_type in LAYERS]
    if not layers:
        return []
    if len(model.graph.output) == 1:
        return [layers[0], layers[-1]]
    producer = {o: n for n in nodes for o in n.output}
    last: list[str] = []
    for out in model.graph.output:
        todo, seen = [out.name], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in LAYERS:
                last += [node.name] if node.name not in last else []
                continue
            todo += list(node.input)
    return [layers[0], *(n for n in last if n != layers[0])]


def pair_outputs(fp32: Path, int8: Path, x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs of both models on the same inputs, through the gate's session factory on CPU."""
    a = twin_runner(fp32, int8, threads)(x)
    k = a.shape[1] // 2
    return a[:, :k], a[:, k:]


def twin_runner(fp32: Path, int8: Path, threads: int = 1) -> Any:
    """A runner (inputs -> outputs) that runs both models and returns their outputs side by side (N, 2K): one
    decode of each film serves both (``evaluate.infer`` takes any runner)."""
    from filmgate.detectors import onnx_session

    sessions = [onnx_session(p, provider="cpu", intra_op_threads=threads) for p in (fp32, int8)]

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = []
        for i in range(0, len(x), 64):
            outs.append(np.concatenate([s.run(["output"], {"image": x[i : i + 64]})[0] for s in sessions], axis=1))
        return np.concatenate(outs)

    return run


def agreement(manifest: ModelManifest, task: Task, a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How closely int8 outputs ``b`` follow fp32 outputs ``a`` at the manifest's threshold."""
    sa, sb = manifest.scores(a), manifest.scores(b)
    fa, fb = manifest.flagged(sa), manifest.flagged(sb)  # at least the threshold (under it: an age detector)
    clean = np.array([not task.is_positive(int(y)) for y in labels], dtype=bool)
    diff = np.abs(sa - sb)
    # how far from the threshold the closest fp32 score lies, as a multiple of the largest score shift: above 1, no
    # verdict could change by quantisation on these films
    margin = float(np.abs(sa - manifest.threshold).min()) if len(sa) else 0.0
    out: dict[str, Any] = {
        "examples": int(len(sa)),
        "verdicts_changed": int((fa != fb).sum()),
        "agreement": float((fa == fb).mean()),
        "max_score_diff": float(diff.max()),
        "p99_score_diff": float(np.percentile(diff, 99)),
        "mean_score_diff": float(diff.mean()),
        "mean_score_shift": float((sb - sa).mean()),
        "closest_to_threshold": margin,
        "clean_examples": int(clean.sum()),
        "clean_flagged_fp32": int(fa[clean].sum()),
        "clean_flagged_int8": int(fb[clean].sum()),
        "faults_caught_fp32": int(fa[~clean].sum()),
        "faults_caught_int8": int(fb[~clean].sum()),
    }
    if manifest.kind == "classifier":
        out["argmax_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def check_parity(result: dict[str, Any]) -> None:
    """The ship step's bar: at most MAX_CHANGED of verdicts changed (at least one may), and at most one more clean
    example flagged."""
    if result["verdicts_changed"] > max(1.0, MAX_CHANGED * result["examples"]):
        raise RuntimeError(f"int8 parity failed: {result['verdicts_changed']} of {result['examples']} verdicts changed")
    if result["clean_flagged_int8"] > result["clean_flagged_fp32"] + 1:
        raise RuntimeError(f"int8 parity failed: {result['clean_flagged_int8']} clean examples flagged "
                           f"(fp32: {result['clean_flagged_fp32']})")  # fmt: skip


def quantize_folder(folder: Path, calibration: int = CALIBRATION_FILMS, parity: int = PARITY_FILMS) -> Path:
    """Make ``folder``'s int8 model from its fp32 one (calibrated on train films), check it against the fp32 model on
    held-out train films, and record both in the manifest. Returns the int8 file."""
    manifest, config, task = shipped_config(folder)
    t0 = time.perf_counter()
    cal_films = calibration_films(manifest, config, task, calibration)
    x_cal, _, _ = examples(cal_films, task, config)
    tmp = folder / (INT8_FILE + ".tmp")
    how = quantize(folder / manifest.file, tmp, x_cal, manifest.input_name)
    how |= {"calibration_split": "train (films trained on; not the threshold's held-out patients, never val)",
            "calibration_films": len(cal_films),
            "calibration_sources": dict(sorted(collections.Counter(f.source for f in cal_films).items()))}  # fmt: skip
    par_films = parity_films(manifest, config, task, parity)
    x_par, y_par, _ = examples(par_films, task, config)
    a, b = pair_outputs(folder / manifest.file, tmp, x_par)
    result = agreement(manifest, task, a, b, y_par) | {
        "films": len(par_films), "split": "train patients held out of training (the threshold's films)",
        "threshold": manifest.threshold, "max_changed": MAX_CHANGED}  # fmt: skip
    print(f"{task.name}: int8 vs fp32 on {result['examples']} examples of {len(par_films)} held-out train films: "
          f"{result['verdicts_changed']} verdicts changed, max |score diff| {result['max_score_diff']:.4f}, "
          f"clean flagged {result['clean_flagged_fp32']} -> {result['clean_flagged_int8']}")  # fmt: skip
    check_parity(result)
    final = folder / INT8_FILE
    os.replace(tmp, final)
    how["seconds"] = round(time.perf_counter() - t0, 1)
    how["created"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest, old = sha256_file(final), manifest.quantized
    # the val and leave-one-source-out comparison (``compare``) stays only while it is of this very int8 file
    keep = {k: v for k, v in old.parity.items() if k != "held_out_train"} if old and old.sha256 == digest else {}
    q = QuantizedModel(file=INT8_FILE, sha256=digest, quantization=how, parity={"held_out_train": result, **keep})
    write_manifest(folder, dataclasses.replace(manifest, quantized=q))
    load_manifest(folder)  # what the gate will do: schema and both sha256
    return final


# ------------------------------------------------------------------------------------------------ the evidence

CRITERION = (
    "not worse: on each group of films the card reports (val pooled and per source, every held-out source of the "
    "leave-one-source-out table, and for detectors that judge them the other kinds of val film and the synthetic "
    "wrong films) the int8 model flags clean films at a rate no higher than the top of the float model's 95% Wilson "
    "interval on the same films, and catches faults at a rate no lower than its bottom; and on the clean films of "
    "the val split it flags no more films than the float model"
)


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"flagged": k, "of": n, "rate": k / n if n else 0.0, "ci95": list(wilson_interval(k, n))}


def _group(manifest: ModelManifest, sa: np.ndarray, sb: np.ndarray, role: str) -> dict[str, Any]:
    """fp32 scores ``sa`` and int8 scores ``sb`` of one group of examples: both flagged rates with intervals."""
    fa, fb = manifest.flagged(sa), manifest.flagged(sb)
    a, b = _rate(int(fa.sum()), len(fa)), _rate(int(fb.sum()), len(fb))
    lo, hi = a["ci95"]
    # one-sided: int8 may flag fewer clean films or catch more faults than the float model, not the other way
    ok = b["rate"] <= hi + 1e-12 if role == "false flags" else b["rate"] >= lo - 1e-12
    return {"role": role, "examples": int(len(sa)), "fp32": a, "int8": b, "verdicts_changed": int((fa != fb).sum()),
            "max_score_diff": float(np.abs(sa - sb).max()) if len(sa) else 0.0, "within_ci": bool(ok)}  # fmt: skip


def _by_role(task: Task, res: dict[str, Any], k: int, manifest: ModelManifest, mask: np.ndarray) -> dict[str, Any]:
    sa, sb = manifest.scores(res["outputs"][mask, :k]), manifest.scores(res["outputs"][mask, k:])
    pos = np.array([task.is_positive(int(y)) for y in res["label"][mask]], dtype=bool)
    out = {}
    if (~pos).any():
        out["clean"] = _group(manifest, sa[~pos], sb[~pos], "false flags")
    if pos.any():
        out["faults"] = _group(manifest, sa[pos], sb[pos], "caught")
    return out


def _scores_of(run: Any, x: np.ndarray, k: int, manifest: ModelManifest) -> tuple[np.ndarray, np.ndarray]:
    out = run(x)
    return manifest.scores(out[:, :k]), manifest.scores(out[:, k:])


def graph_twin_runner(own: Path, graph: Path, own_channel: int, inputs: Mapping[str, int], output: str,
                      threads: int = 1) -> Any:  # fmt: skip
    """:func:`twin_runner` for a detector computed in a shared graph: its own model (fed channel ``own_channel`` of
    :func:`filmgate_training.data.prepare`'s stacked inputs) and the graph (each input fed its channel), the graph's
    ``output`` for this detector; outputs side by side (N, 2K)."""
    from filmgate.detectors import onnx_session

    a, b = (onnx_session(p, provider="cpu", intra_op_threads=threads) for p in (own, graph))

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = []
        for i in range(0, len(x), 64):
            c = x[i : i + 64]
            mine = a.run(["output"], {"image": np.ascontiguousarray(c[:, own_channel : own_channel + 1])})[0]
            feeds = {n: np.ascontiguousarray(c[:, j : j + 1]) for n, j in inputs.items()}
            outs.append(np.concatenate([mine, b.run([output], feeds)[0]], axis=1))
        return np.concatenate(outs)

    return run


def compare(folder: Path, threads: int = 1, loso_limit: int | None = None, graph: str | None = None,
            val_limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """fp32 against int8 of the shipped detector in ``folder`` on the same films (see the module's docstring).
    ``graph`` "int8" or "fp32": the detector's own float model against that file of the shared graph it is computed
    in (``manifest.graph``), on the same films, the graph fed as the gate feeds it. ``val_limit``: at most this many
    val films (per kind), for smoke runs (else the detector's own ``data.max_val_films``)."""
    from filmgate.decode import DecodeError, decode_file
    from filmgate_training import loso
    from filmgate_training.data import Specs, prepare
    from filmgate_training.detectors.corrupt import CORRUPTIONS
    from filmgate_training.evaluate import infer

    manifest, config, task = shipped_config(folder)
    if val_limit is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_val_films=val_limit))
    t0 = time.perf_counter()
    k = task.num_outputs
    spec: Specs = config.preprocessing
    g = manifest.graph
    if graph is not None:
        if g is None or (graph == "int8" and g.quantized is None):
            raise RuntimeError(f"{folder}: no shared graph ({graph}) in the manifest; run `python -m "
                               "filmgate_training graph` first")  # fmt: skip
        specs = tuple(dict.fromkeys([*g.inputs.values(), manifest.preprocessing]))
        other = g.file if graph == "fp32" or g.quantized is None else g.quantized.file
        other_sha = g.sha256 if graph == "fp32" or g.quantized is None else g.quantized.sha256
        run = graph_twin_runner(folder / manifest.file, folder.parent / other, specs.index(manifest.preprocessing),
                                {n: specs.index(s) for n, s in g.inputs.items()}, g.output_name, threads)  # fmt: skip
        spec = specs
        against = {"file": other, "sha256": other_sha, "graph": g.file, "precision": graph}
    else:
        if manifest.quantized is None:
            raise RuntimeError(f"{folder}: no int8 model yet; run `python -m filmgate_training quantize` first")
        run = twin_runner(folder / manifest.file, folder / manifest.quantized.file, threads)
        against = {"file": manifest.quantized.file, "sha256": manifest.quantized.sha256}

    # the val split as it is now, in every variant, as evaluate runs it: sources a model was trained without
    # (data.exclude_sources, e.g. to keep later hospitals held out) are part of today's val all the same
    today = dataclasses.replace(config, data=dataclasses.replace(config.data, exclude_sources=()))
    res = infer(val_films(today, task), task, spec, run)
    every = np.ones(len(res["label"]), bool)
    val: dict[str, Any] = {"pooled": _by_role(task, res, k, manifest, every), "per_source": {}}
    for s in sorted(set(res["source"].tolist())):
        val["per_source"][s] = _by_role(task, res, k, manifest, res["source"] == s)
    val["agreement"] = agreement(manifest, task, res["outputs"][:, :k], res["outputs"][:, k:], res["label"])

    kinds: dict[str, Any] = {}  # every val film of every kind as it came (what the gate sees most)
    everything = sorted(select(split="val"), key=lambda f: str(f.path))
    films = [f for kind in sorted({f.kind for f in everything})  # a cap only for smoke runs (data.max_val_films)
             for f in cap([f for f in everything if f.kind == kind], config.data.max_val_films)]  # fmt: skip
    by_kind: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    adults, n_adult = [], 0
    for film in films:
        try:
            px = decode_file(film.path).pixels
        except DecodeError:
            continue
        by_kind[film.kind].append(prepare(px, spec))
        if film.kind == "frontal-chest" and film.pediatric != "yes":
            n_adult += 1
            if n_adult % 3 == 1:
                adults.append(px)
    for kind, xs in sorted(by_kind.items()):  # frontal films as they came are clean, other kinds "faults"
        sa, sb = _scores_of(run, np.stack(xs), k, manifest)
        kinds[kind] = _group(manifest, sa, sb, "false flags" if kind == "frontal-chest" else "caught")
    synthetic = {}  # wrong films made from every third adult val frontal film (what ``atypical`` must catch)
    for name, fn in CORRUPTIONS.items() if adults else ():
        sa, sb = _scores_of(run, np.stack([prepare(fn(px), spec) for px in adults]), k, manifest)
        synthetic[name] = _group(manifest, sa, sb, "caught")

    held_out: dict[str, Any] = {}  # the sources of the card's leave-one-source-out table, the same films
    for key, row in sorted(manifest.metrics.get("loso", {}).items()):
        source, mode = key.split(" (")[0], key.split(" (")[1].rstrip(")")
        films_s = loso.held_out_films(config, task, source)
        if loso_limit is not None and len(films_s) > loso_limit:
            films_s = films_s[:: max(1, len(films_s) // loso_limit)][:loso_limit]
        r = infer(films_s, task.for_held_out(), spec, run)
        entry = _by_role(task.for_held_out(), r, k, manifest, np.ones(len(r["label"]), bool))
        entry |= {"films": int(len(set(r["rel"].tolist()))), "card_mode": mode, "card_model": row.get("model"),
                  "card": {x: row[x] for x in ("false_flags", "caught") if x in row}}  # fmt: skip
        held_out[source] = entry

    groups = [g for m in (val["pooled"], *val["per_source"].values(), *held_out.values()) for g in m.values()
              if isinstance(g, dict) and "within_ci" in g]  # fmt: skip
    # the kinds a detector is trained to judge (view: all four) and, for a score detector (atypical), the wrong
    # films it is there to catch; the others' verdicts on them are reported but decided by view and atypical
    groups += [g for kind, g in kinds.items() if kind in task.film_kinds or task.kind == "score"]
    groups += list(synthetic.values()) if task.kind == "score" else []
    for g in (*kinds.values(), *synthetic.values()):
        g["judged"] = any(g is x for x in groups)
    clean = val["pooled"].get("clean")
    not_worse = all(g["within_ci"] for g in groups) and (clean is None or clean["int8"]["flagged"] <=
                                                           clean["fp32"]["flagged"])  # fmt: skip
    return {
        "detector": task.name,
        "version": manifest.version,
        "threshold": manifest.threshold,
        "fp32": {"file": manifest.file, "sha256": manifest.sha256},
        "int8": against,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "criterion": CRITERION,
        "not_worse": bool(not_worse),
        "val": val,
        "val_kinds": kinds,
        "synthetic": synthetic,
        "loso": held_out,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _cell(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['flagged']}/{m['of']} ({100 * m['rate']:.2f}%; {100 * lo:.2f}-{100 * hi:.2f}%)"


def markdown(r: dict[str, Any], full: bool = True) -> str:
    """The comparison (``int8.md``); ``full=False``: as the card shows it, without the per-source val rows and the
    rows outside the criterion (those are in int8.md)."""
    ag = r["val"]["agreement"]
    g = r["int8"].get("graph")
    if g:  # a shared graph's output against the detector's own float model
        title = f"## Shared graph: `{r['detector']}` {r['version']} in `{g}`"
        intro = (f"The gate computes this detector in the graph `{g}` it shares with other detectors (`manifest.graph`"
                 f"; one session.run for all of them): `{r['int8']['file']}` ({r['int8']['precision']}"
                 f"{', what the gate runs on CPU' if r['int8']['precision'] == 'int8' else ', what CUDA runs'}). "
                 "Made by `python -m filmgate_training graph` from the members' own models (int8 calibrated on their "
                 f"train films, never val, nor held-out sources). Here against this detector's own float model "
                 f"`{r['fp32']['file']}` (the model evaluated above), both on the same films")  # fmt: skip
    else:
        title = f"## int8 on CPU: `{r['detector']}` {r['version']}"
        intro = (f"On CPU the gate runs `{r['int8']['file']}` (int8, QDQ; `manifest.quantized`), on CUDA "
                 f"`{r['fp32']['file']}` (float32, the model evaluated above). Made by `python -m filmgate_training "
                 "quantize` from the float model, calibrated on train films of the sources it trained on (never val, "
                 "nor held-out sources). Both models on the same films")  # fmt: skip
    lines = [
        title,
        "",
        f"{intro} at threshold {r['threshold']:.6g}; flagged counts with 95% Wilson intervals"
        f"{' (the int8 column is `' + r['int8']['file'] + '`)' if g else ''}. "
        f"**{'Not worse' if r['not_worse'] else 'WORSE'}** ({r['criterion']}).",
        "",
        f"Val split, every variant: {ag['examples']} examples, {ag['verdicts_changed']} verdicts changed, largest "
        f"score difference {ag['max_score_diff']:.4f} (99th percentile {ag['p99_score_diff']:.4f}, mean shift "
        f"{ag['mean_score_shift']:+.5f}).",
        "",
        "| films | role | fp32 flagged | int8 flagged | verdicts changed | max score diff |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def rows(label: str, groups: dict[str, Any], card: dict[str, Any] | None = None) -> None:
        for key, g in groups.items():
            role = g["role"] + ("" if g.get("judged", True) else " (not in the criterion)")
            c = (card or {}).get({"clean": "false_flags", "faults": "caught"}.get(key, ""))
            said = f" (card: {c['flagged']}/{c['of']})" if c else ""
            lines.append(f"| {label} | {role}{said} | {_cell(g['fp32'])} | {_cell(g['int8'])} | "
                         f"{g['verdicts_changed']}/{g['examples']} | {g['max_score_diff']:.4f} |")  # fmt: skip

    rows("val pooled", r["val"]["pooled"])
    for s, m in r["val"]["per_source"].items() if full else ():
        rows(f"val {s}", m)
    for kind, g in r["val_kinds"].items():
        if full or g.get("judged"):
            rows(f"val {kind}", {"g": g})
    for name, g in r["synthetic"].items():
        if full or g.get("judged"):
            rows(f"val adults {name}", {"g": g})
    for s, m in r["loso"].items():
        rows(f"held out: {s} ({m['card_mode']}, {m['films']} films)",
             {k: v for k, v in m.items() if k in ("clean", "faults")}, m.get("card"))  # fmt: skip
    lines += ["", "Val: every film of the val split as it is now (sources added since the model was trained "
              "included, so more films than the evaluation above). Held-out rows marked *fold* are the shipped "
              "model on a source it trained on (the card's figure, in brackets, is of a model retrained without "
              "it); *unseen* rows are the card's own figure, on the same films. Rows *not in the criterion*: films "
              "whose gate decision another detector makes (view, atypical); this detector's verdict on them is "
              "shown for completeness.", ""]  # fmt: skip
    if not full:
        lines += ["Per source of val and every kind of film: [int8.md](int8.md) (int8.json).", ""]
    return "\n".join(lines)


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the comparison (``quantized.parity``)."""
    ag = r["val"]["agreement"]
    loso = {s: {k: {"fp32": m[k]["fp32"], "int8": m[k]["int8"], "verdicts_changed": m[k]["verdicts_changed"]}
                for k in ("clean", "faults") if k in m} for s, m in r["loso"].items()}  # fmt: skip
    changed = sum(g["verdicts_changed"] for g in (*r["val_kinds"].values(), *r["synthetic"].values()))
    return {"compared": r["created"], "not_worse": r["not_worse"], "criterion": r["criterion"],
            "val": {k: ag[k] for k in ("examples", "verdicts_changed", "max_score_diff", "p99_score_diff",
                                       "mean_score_shift", "clean_flagged_fp32", "clean_flagged_int8")},
            "val_kinds_and_synthetic_verdicts_changed": changed, "loso": loso}  # fmt: skip


def write_report(folder: Path, r: dict[str, Any]) -> Path:
    """The comparison beside the model: ``int8.json`` and ``int8.md`` (the card links to it)."""
    from filmgate_training.evaluate import _jsonable

    (folder / "int8.json").write_text(json.dumps(_jsonable(r), indent=2) + "\n")
    md = folder / "int8.md"
    md.write_text(f"# int8 against float32: `{r['detector']}` {r['version']}\n\n" + markdown(r).split("\n", 2)[2])
    return md


def load_report(folder: Path) -> dict[str, Any]:
    path = folder / "int8.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no comparison yet; run `quantize --compare`")
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def write_card(folder: Path, r: dict[str, Any]) -> None:
    """The comparison into the model card (between markers, replaced on each run) and its headline into the
    manifest's ``quantized.parity``; refused when the report is of other model files than the folder's."""
    manifest = load_manifest(folder)
    q = manifest.quantized
    if q is None or q.sha256 != r["int8"]["sha256"] or manifest.sha256 != r["fp32"]["sha256"]:
        raise RuntimeError(f"{folder}: the comparison was made with other model files; run --compare again")
    card = folder / manifest.card
    put_section(card, CARD_BEGIN, CARD_END, markdown(r, full=False))
    parity = {"held_out_train": q.parity.get("held_out_train", {})} | headline(r)
    write_manifest(folder, dataclasses.replace(manifest, quantized=dataclasses.replace(q, parity=parity)))
    load_manifest(folder)


def ship_int8(folder: Path) -> Path | None:
    """The quantise step of the one ship path (``export.install``): the int8 model, its parity check and the
    comparison on val and the card's leave-one-source-out sources, into the manifest and the card. A model whose
    int8 copy fails the parity check ships float only (the gate then runs the float model on CPU too) and says why in
    ``extra.int8_refused``; the shipped-model tests fail on it, so it is never silent."""
    stale = folder / INT8_FILE
    stale.unlink(missing_ok=True)  # of an earlier model: the manifest just written does not name it
    try:
        path = quantize_folder(folder)
    except RuntimeError as exc:
        print(f"{folder.name}: shipped without an int8 model: {exc}")
        manifest = load_manifest(folder)
        write_manifest(folder, dataclasses.replace(manifest, extra=dict(manifest.extra) | {"int8_refused": str(exc)}))
        (folder / (INT8_FILE + ".tmp")).unlink(missing_ok=True)
        return None
    report = compare(folder)
    write_report(folder, report)
    write_card(folder, report)
    return path
