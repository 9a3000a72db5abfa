"""The model manifest: what a shipped detector is, how to feed it and how to read its output.

Each detector lives in its own folder ``models/<name>/`` with ``manifest.json``, the ONNX file and a model card. The
gate loads every folder it finds (no code change to add a detector); training writes the manifest through
:meth:`ModelManifest.to_dict`, so both sides agree on one schema. Turning raw outputs into a score is also defined
here, once, so that the thresholds chosen in training mean the same thing in the gate.

Two kinds of detector:

- ``classifier``: the ONNX output is logits over ``labels``; the score is the softmax probability mass of
  ``positive_labels`` (for orientation: rot90 + rot180 + rot270), the predicted class is the arg-max label.
- ``score``: the ONNX output is one number per film (for example an out-of-distribution distance), higher is worse.
- ``age``: the ONNX output is one number per film, the patient's estimated age in years (``pediatric``). The film is
  flagged when the age is *under* the threshold, a cut in years; the gate's policy applies its own cut
  (``policy.pediatric_age_years``) to it, the one it applies to the header's age.

A film is flagged with ``reason`` when its score is at least ``threshold`` (under it, for an ``age`` detector:
:meth:`Finding.below`, :meth:`ModelManifest.flagged`).

``file`` is the float32 reference model (what training evaluated). ``quantized``, when present, names a second file
of the same detector for the CPU provider: the int8 model made from ``file`` by ``python -m filmgate_training
quantize`` (calibrated on train films, checked against ``file`` on real films; both figures are in the record). The
gate runs it on CPU, where it is about 2.5 times faster; on CUDA it runs ``file`` (see :meth:`ModelManifest.file_for`).

``graph``, when present, says that the gate computes this detector's output in a graph shared with other detectors
(:class:`SharedGraph`): one ONNX file under the models folder with one output per member detector and one input per
preprocessing it needs, run once per batch for all of them (``atypical`` contains the ``view`` network: in one graph
the view network runs once per film, not twice). ``file`` stays the detector's own model, the one it was evaluated
as; the graph is checked to compute the same function (its ``parity``) and is what the gate runs. Each member's
manifest carries the same record but for ``output_name``, the output it reads; ``members`` names every member with
the sha256 of the model file the graph was built from, so a graph built from another model file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.preprocess import PreprocessSpec
from filmgate.typed_config import ConfigError, build

MANIFEST_NAME = "manifest.json"
DETECTOR_KINDS = ("classifier", "score", "age")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match its model file."""


@dataclass(frozen=True)
class Finding:
    """What one detector says about one film."""

    detector: str
    reason: str
    score: float
    threshold: float
    flagged: bool
    predicted: str | None = None
    probabilities: Mapping[str, float] | None = None
    below: bool = False  # an age detector's: flagged when the score (an age) is under the threshold (a cut)

    def flags(self, threshold: float) -> bool:
        """Whether this score is flagged at ``threshold`` (the policy's, which may differ from the manifest's)."""
        return self.score < threshold if self.below else self.score >= threshold

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "detector": self.detector,
            "reason": self.reason,
            "score": round(self.score, 6),
            "threshold": self.threshold,
            "flagged": self.flagged,
        }
        if self.predicted is not None:
            out["predicted"] = self.predicted
        if self.probabilities is not None:
            out["probabilities"] = {k: round(v, 6) for k, v in self.probabilities.items()}
        if self.below:
            out["flagged_when"] = "score < threshold"  # the score is an age in years, the threshold the cut
        return out


@dataclass(frozen=True)
class QuantizedModel:
    """The int8 copy of a detector (``manifest.quantized``): its file and sha256, which providers run it, how it was
    made (``quantization``) and how closely it follows the float model on real films (``parity``)."""

    file: str
    sha256: str
    precision: str = "int8"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    quantization: Mapping[str, Any] = field(default_factory=dict)
    parity: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "precision": self.precision,
                "providers": list(self.providers), "quantization": dict(self.quantization),
                "parity": dict(self.parity)}  # fmt: skip


@dataclass(frozen=True)
class SharedGraph:
    """``manifest.graph``: the graph the gate computes this detector in, shared with the other ``members``.

    ``file`` (and ``quantized.file``) are paths relative to the models folder (``graphs-<name>/model.onnx``), never
    absolute nor going up; ``inputs`` maps each graph input to the preprocessing the gate feeds it; ``output_name`` is
    the output this detector reads (raw, as its own model's output); ``members`` maps every member detector to the
    sha256 of its own model file (``file``) the graph was built from; ``parity`` how closely the graph follows the
    members' own models on real films."""

    file: str
    sha256: str
    output_name: str
    inputs: Mapping[str, PreprocessSpec]
    members: Mapping[str, str]
    quantized: QuantizedModel | None = None
    parity: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in (self.file, *(() if self.quantized is None else (self.quantized.file,))):
            parts = Path(f).parts
            if not parts or Path(f).is_absolute() or ".." in parts:
                raise ManifestError(f"graph file {f!r} must be a path inside the models folder (no '..', relative)")
        if not self.inputs:
            raise ManifestError("graph.inputs: a graph needs at least one input")
        if not self.members:
            raise ManifestError("graph.members: a graph names the detectors that share it")

    def file_for(self, provider: str, precision: str = "auto") -> tuple[str, str]:
        """(graph file, precision) to run on ``provider``: as :meth:`ModelManifest.file_for`."""
        q = self.quantized
        if precision == "auto" and q is not None and provider in q.providers:
            return q.file, q.precision
        return self.file, "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "output_name": self.output_name,
                "inputs": {k: v.to_dict() for k, v in self.inputs.items()}, "members": dict(self.members),
                "quantized": None if self.quantized is None else self.quantized.to_dict(),
                "parity": dict(self.parity)}  # fmt: skip


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    file: str
    kind: str
    reason: str
    threshold: float
    preprocessing: PreprocessSpec
    labels: tuple[str, ...] = ()
    positive_labels: tuple[str, ...] = ()
    input_name: str = "image"
    output_name: str = "output"
    sha256: str = ""
    description: str = ""
    card: str = "MODEL_CARD.md"
    created: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training_data: Sequence[Mapping[str, Any]] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    quantized: QuantizedModel | None = None
    graph: SharedGraph | None = None

    def __post_init__(self) -> None:
        if self.graph is not None and self.name not in self.graph.members:
            raise ManifestError(f"{self.name}: graph.members does not name this detector")
        if self.kind not in DETECTOR_KINDS:
            raise ManifestError(f"{self.name}: kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        if self.kind == "classifier":
            if len(self.labels) < 2:
                raise ManifestError(f"{self.name}: a classifier needs at least two labels")
            missing = set(self.positive_labels) - set(self.labels)
            if not self.positive_labels or missing:
                raise ManifestError(
                    f"{self.name}: positive_labels must be a non-empty subset of labels (unknown: {sorted(missing)})"
                )
        if not self.reason:
            raise ManifestError(f"{self.name}: reason (the quarantine reason this detector raises) is required")

    # ------------------------------------------------------------------------------------------ (de)serialising

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelManifest:
        """A manifest mapping (``manifest.json``) -> the manifest, by the same loader as the configurations: unknown
        keys refused, every value checked against its annotation, a :class:`ManifestError` naming the key otherwise.
        The free-form parts (metrics, training data, extra) stay plain JSON values."""
        try:
            m: ModelManifest = build(cls, data, "manifest.")
        except ConfigError as exc:
            raise ManifestError(str(exc)) from exc
        q, g = _plain_quantized(m.quantized), m.graph
        if g is not None:
            g = dataclasses.replace(g, inputs=dict(g.inputs), members=dict(g.members),
                                    quantized=_plain_quantized(g.quantized), parity=dict(g.parity))  # fmt: skip
        return dataclasses.replace(m, metrics=dict(m.metrics), training_data=[dict(d) for d in m.training_data],
                                   extra=dict(m.extra), quantized=q, graph=g)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "file": self.file,
            "sha256": self.sha256,
            "kind": self.kind,
            "reason": self.reason,
            "labels": list(self.labels),
            "positive_labels": list(self.positive_labels),
            "threshold": self.threshold,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "preprocessing": self.preprocessing.to_dict(),
            "created": self.created,
            "card": self.card,
            "metrics": dict(self.metrics),
            "training_data": list(self.training_data),
            "extra": dict(self.extra),
            "quantized": None if self.quantized is None else self.quantized.to_dict(),
        }
        if self.graph is not None:  # absent rather than null: most detectors have their own graph only
            out["graph"] = self.graph.to_dict()
        return out

    def file_for(self, provider: str, precision: str = "auto") -> tuple[str, str]:
        """(model file, precision) to run on ``provider`` (an onnxruntime provider name): the quantized file where
        it lists the provider and ``precision`` is "auto", else the float reference ``file``. CUDA runs the float
        file: it is the model training evaluated, and a GPU gains nothing from int8 at these sizes (onnxruntime's
        CUDA provider runs QDQ models by dequantising, so it would only add work)."""
        q = self.quantized
        if precision == "auto" and q is not None and provider in q.providers:
            return q.file, q.precision
        return self.file, "fp32"

    # ------------------------------------------------------------------------------------------ scoring

    def findings(self, outputs: np.ndarray, threshold: float | None = None) -> list[Finding]:
        """Raw ONNX outputs for a batch -> one :class:`Finding` per film."""
        limit = self.threshold if threshold is None else threshold
        if self.kind == "score":
            values = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]
            return [Finding(self.name, self.reason, float(v), limit, bool(v >= limit)) for v in values]
        if self.kind == "age":
            values = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]
            return [Finding(self.name, self.reason, float(v), limit, bool(v < limit), below=True) for v in values]
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        positive = [self.labels.index(label) for label in self.positive_labels]
        result = []
        for row in probs:
            score = float(row[positive].sum())
            result.append(
                Finding(
                    detector=self.name,
                    reason=self.reason,
                    score=score,
                    threshold=limit,
                    flagged=score >= limit,
                    predicted=self.labels[int(row.argmax())],
                    probabilities=dict(zip(self.labels, (float(p) for p in row), strict=True)),
                )
            )
        return result

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """The score per film (what ``threshold`` is compared with), for evaluation and calibration."""
        if self.kind in ("score", "age"):
            return np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        positive = [self.labels.index(label) for label in self.positive_labels]
        return probs[:, positive].sum(axis=1)


    def flagged(self, scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Which of :meth:`scores` are flagged at ``threshold`` (default the manifest's): at least it, or under it
        for an ``age`` detector."""
        limit = self.threshold if threshold is None else threshold
        values = np.asarray(scores, dtype=np.float64)
        return values < limit if self.kind == "age" else values >= limit


def _plain_quantized(q: QuantizedModel | None) -> QuantizedModel | None:
    """The free-form parts of a quantized record as plain JSON values (not the loader's read-only mappings)."""
    return None if q is None else dataclasses.replace(q, quantization=dict(q.quantization), parity=dict(q.parity))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(folder: Path, verify: bool = True) -> ModelManifest:
    """Read ``folder/manifest.json`` and (by default) check the ONNX file's sha256 against it."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    try:
        manifest = ModelManifest.from_dict(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    model_path = folder / manifest.file
    if not model_path.is_file():
        raise ManifestError(f"{path}: model file {manifest.file} is missing")
    if verify and manifest.sha256 and sha256_file(model_path) != manifest.sha256:
        raise ManifestError(f"{path}: sha256 of {manifest.file} does not match the manifest (file changed?)")
    q = manifest.quantized
    if q is not None:
        if not (folder / q.file).is_file():
            raise ManifestError(f"{path}: quantized model file {q.file} is missing")
        if verify and sha256_file(folder / q.file) != q.sha256:
            raise ManifestError(f"{path}: sha256 of {q.file} does not match the manifest (file changed?)")
    if manifest.graph is not None:
        check_graph(folder.parent, manifest, verify, where=str(path))
    return manifest


def check_graph(models_dir: Path, manifest: ModelManifest, verify: bool = True, where: str = "") -> None:
    """``manifest.graph`` against the files: both graph files exist under ``models_dir`` (sha256 checked with
    ``verify``) and the graph was built from this very model file (``members``)."""
    g = manifest.graph
    if g is None:
        return
    where = where or manifest.name
    if g.members.get(manifest.name) != manifest.sha256:
        raise ManifestError(f"{where}: graph {g.file} was built from another {manifest.file} than this one (sha256 "
                            "in graph.members); rebuild it: python -m filmgate_training graph")  # fmt: skip
    files = [(g.file, g.sha256)] + ([] if g.quantized is None else [(g.quantized.file, g.quantized.sha256)])
    for file, digest in files:
        target = models_dir / file
        if not target.is_file():
            raise ManifestError(f"{where}: graph file {file} is missing under {models_dir}")
        if verify and sha256_file(target) != digest:
            raise ManifestError(f"{where}: sha256 of graph file {file} does not match the manifest (file changed?)")


def shipped_models_dir() -> Path:
    """The detectors installed with filmgate (the package ``filmgate.models``, built from the repository's
    ``models/``), so that the gate finds them wherever it runs, not only from the repository root."""
    import importlib.util

    spec = importlib.util.find_spec("filmgate.models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "models"  # a source checkout run without installing


def resolve_models_dir(models_dir: str | Path) -> Path:
    """``detectors.models_dir`` as configured, or the shipped models when it is empty."""
    return Path(models_dir) if str(models_dir) else shipped_models_dir()


def discover(models_dir: Path) -> list[tuple[Path, ModelManifest]]:
    """Every detector folder under ``models_dir`` (sorted by name), with its manifest."""
    found = []
    for manifest_path in sorted(Path(models_dir).glob(f"*/{MANIFEST_NAME}")):
        found.append((manifest_path.parent, load_manifest(manifest_path.parent)))
    return found


def discover_manifests(models_dir: Path) -> list[ModelManifest]:
    """The manifests under ``models_dir`` without hashing the model files: what the config check needs (names and
    reasons) at the cost of reading a few small JSON files."""
    return [load_manifest(p.parent, verify=False) for p in sorted(Path(models_dir).glob(f"*/{MANIFEST_NAME}"))]


def write_manifest(folder: Path, manifest: ModelManifest) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return path
