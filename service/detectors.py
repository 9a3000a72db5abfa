"""The detectors: every model folder under ``models/`` is loaded once, run in batches, and read via its manifest.

A new detector (flip, view, pediatric, atypical) needs no code here: its manifest says how to preprocess, how to
score and which quarantine reason it raises. Films are preprocessed once per distinct preprocessing spec, so models
that share one (most do) share the work. onnxruntime-gpu silently falls back to CPU, so the provider really in use
is read back from the session, logged and exported as ``filmgate_model_info``.

A manifest may name an int8 copy of its model for the CPU provider (``quantized``): the gate runs it there and the
float model on CUDA (``ModelManifest.file_for``; ``detectors.precision: fp32`` keeps the float model everywhere).
Which file runs is chosen from the provider really in use, so a CUDA build that falls back to CPU runs int8 too.

Detectors whose manifests name one shared graph (``manifest.graph``: e.g. ``view`` and ``atypical``, whose network
contains view's) share one session of it, opened once, and :meth:`DetectorSet.run` runs each distinct session once per
batch, feeding every input the graph declares and reading each member's output (``detectors.shared_graphs: false``
runs every detector's own model file instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filmgate import metrics
from filmgate.config import DetectorsConfig
from filmgate.manifest import Finding, ManifestError, ModelManifest, discover, resolve_models_dir
from filmgate.preprocess import PreprocessSpec, fit_square, normalize

log = logging.getLogger("filmgate.detectors")


@dataclass
class OnnxDetector:
    """One detector: its manifest and the session that computes its output (its own model, or a graph it shares
    with other detectors: then ``graph`` names the graph file and ``session`` is the one shared session)."""

    manifest: ModelManifest
    folder: Path
    session: object
    provider: str
    precision: str = "fp32"  # of the file that runs: "int8" (the manifest's quantized model) or "fp32"
    graph: str = ""  # the shared graph file (relative to the models folder) this detector is computed in, if any

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def inputs(self) -> Mapping[str, PreprocessSpec]:
        """The session's inputs and the preprocessing each is fed."""
        g = self.manifest.graph
        if self.graph and g is not None:
            return g.inputs
        return {self.manifest.input_name: self.manifest.preprocessing}

    @property
    def output_name(self) -> str:
        g = self.manifest.graph
        return g.output_name if self.graph and g is not None else self.manifest.output_name

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The detector's raw outputs for prepared (N, 1, S, S) batches, one per input of :attr:`inputs`."""
        return self.session.run([self.output_name], dict(feeds))[0]  # type: ignore[attr-defined,no-any-return]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[Finding]:
        return self.manifest.findings(self.outputs(feeds))


def _providers(choice: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def onnx_session(path: str | Path, *, provider: str = "cpu", intra_op_threads: int = 0) -> Any:
    """THE one place an onnxruntime session is made (the gate's detectors, training's evaluation and parity, tests,
    benchmarks), so every caller runs a model with the same options: one inter-op thread, ``intra_op_threads`` per
    model (0 lets onnxruntime choose), quiet logs, ``provider`` "cpu", "cuda" or "auto" (CUDA when onnxruntime has
    it, else CPU). onnxruntime falls back to CPU silently: read ``session.get_providers()[0]`` for the one in use."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    ort.set_default_logger_severity(4)  # a missing CUDA library is reported by the caller as the provider really used
    return ort.InferenceSession(str(path), sess_options=opts, providers=_providers(provider))


def _open(path: Path, name: str, file_for: Callable[[str], tuple[str, str]], cfg: DetectorsConfig
          ) -> tuple[Any, str, str, str]:  # fmt: skip
    """(session, provider really used, file, precision) of the file ``file_for(provider)`` names under ``path``."""
    cpu = "CPUExecutionProvider"
    wanted = cpu if _providers(cfg.provider)[0] == cpu else "CUDAExecutionProvider"
    file, precision = file_for(wanted)
    session = onnx_session(path / file, provider=cfg.provider, intra_op_threads=cfg.intra_op_threads)
    used = session.get_providers()[0]
    if cfg.provider == "cuda" and used != "CUDAExecutionProvider":
        raise RuntimeError(f"detectors.provider is cuda but {name} runs on {used} (no usable GPU)")
    if used != wanted and file_for(used)[0] != file:  # CUDA fell back to CPU silently
        file, precision = file_for(used)
        session = onnx_session(path / file, provider="cpu", intra_op_threads=cfg.intra_op_threads)
    return session, used, file, precision


def _onnx_factory(folder: Path, manifest: ModelManifest, cfg: DetectorsConfig,
                  shared: dict[str, tuple[Any, str, str]] | None = None) -> OnnxDetector:  # fmt: skip
    """The detector's own model, or (``manifest.graph``, unless ``detectors.shared_graphs`` is false) the graph it
    shares: opened once per graph file and precision, the session kept in ``shared`` for the other members."""
    g = manifest.graph
    if g is None or not cfg.shared_graphs:
        session, used, _, precision = _open(folder, manifest.name, lambda p: manifest.file_for(p, cfg.precision), cfg)
        return OnnxDetector(manifest=manifest, folder=folder, session=session, provider=used, precision=precision)
    shared = {} if shared is None else shared
    key = f"{g.file}|{g.sha256}"
    if key not in shared:
        session, used, file, precision = _open(folder.parent, f"graph {g.file}",
                                               lambda p: g.file_for(p, cfg.precision), cfg)  # fmt: skip
        shared[key] = (session, used, precision)
    session, used, precision = shared[key]
    names_in = {i.name for i in session.get_inputs()}
    names_out = {o.name for o in session.get_outputs()}
    if set(g.inputs) != names_in or g.output_name not in names_out:
        raise ManifestError(f"{folder / 'manifest.json'}: graph {g.file} has inputs {sorted(names_in)} and outputs "
                            f"{sorted(names_out)}; the manifest declares inputs {sorted(g.inputs)} and output "
                            f"{g.output_name!r}")  # fmt: skip
    return OnnxDetector(manifest=manifest, folder=folder, session=session, provider=used, precision=precision,
                        graph=g.file)  # fmt: skip


# The detector registry: how a model file is run, by file suffix. ONNX is the only runtime today. ``shared`` is the
# load's cache of sessions of graphs shared by several detectors.
DETECTOR_FACTORIES: dict[str, Callable[..., OnnxDetector]] = {
    ".onnx": _onnx_factory,
}


def load_detector(folder: Path, manifest: ModelManifest, cfg: DetectorsConfig,
                  shared: dict[str, tuple[Any, str, str]] | None = None) -> OnnxDetector:  # fmt: skip
    """One detector from its folder, by the registry's runtime for its model file (``shared``: sessions of shared
    graphs opened by the detectors loaded before it)."""
    factory = DETECTOR_FACTORIES.get(Path(manifest.file).suffix.lower())
    if factory is None:
        raise RuntimeError(f"{folder}: no runtime for model file {manifest.file}")
    return factory(folder, manifest, cfg, shared)


def check_shared(detectors: Sequence[OnnxDetector]) -> None:
    """Detectors computed in one graph agree on it: the same record (but for the output each reads), and every
    member loaded is the very model the graph was built from."""
    by_graph: dict[str, list[OnnxDetector]] = {}
    for d in detectors:
        if d.graph:
            by_graph.setdefault(d.graph, []).append(d)
    loaded = {d.name: d.manifest.sha256 for d in detectors}
    for file, members in by_graph.items():
        first = members[0].manifest.graph
        assert first is not None
        for d in members[1:]:
            g = d.manifest.graph
            assert g is not None
            if (g.sha256, dict(g.members), dict(g.inputs)) != (first.sha256, dict(first.members), dict(first.inputs)):
                raise ManifestError(f"graph {file}: the manifests of {members[0].name} and {d.name} describe it "
                                    "differently (sha256, members or inputs); rebuild it")  # fmt: skip
        for name, digest in first.members.items():
            if name in loaded and loaded[name] != digest:
                raise ManifestError(f"graph {file} was built from another {name} model than the one installed; "
                                    "rebuild it: python -m filmgate_training graph")  # fmt: skip


class DetectorSet:
    """All loaded detectors; preprocesses and runs them on batches of decoded films."""

    def __init__(self, detectors: Sequence[OnnxDetector]) -> None:
        self.detectors = list(detectors)
        check_shared(self.detectors)
        self.specs: list[PreprocessSpec] = list(dict.fromkeys(s for d in self.detectors for s in d.inputs.values()))
        self._models_of_spec = {s: [d.name for d in self.detectors if s in d.inputs.values()] for s in self.specs}
        # each distinct session (a detector's own model, or a graph several share) runs once per batch
        self.sessions: list[list[OnnxDetector]] = []
        for d in self.detectors:
            group = next((g for g in self.sessions if g[0].session is d.session), None)
            if group is None:
                self.sessions.append([d])
            else:
                group.append(d)

    @classmethod
    def load(cls, cfg: DetectorsConfig, *, require: bool | None = None) -> DetectorSet:
        """Load every detector under ``cfg.models_dir``. With ``detectors.require`` (the default for the node) an
        empty or missing folder is an error: a wrong path must not turn the gate into "accept everything"."""
        require = cfg.require if require is None else require
        models_dir = resolve_models_dir(cfg.models_dir)
        if not models_dir.is_dir():
            if require:
                raise RuntimeError(
                    f"detectors.models_dir: folder {models_dir} does not exist (set detectors.require: false to run "
                    "on metadata rules only)"
                )
            log.warning("models folder %s does not exist: no detectors loaded", models_dir)
            return cls([])
        loaded = []
        shared: dict[str, tuple[Any, str, str]] = {}
        for folder, manifest in discover(models_dir):
            if manifest.name in cfg.disabled:
                log.info("detector %s disabled by detectors.disabled", manifest.name)
                continue
            det = load_detector(folder, manifest, cfg, shared)
            log.info(
                "detector %s version %s (reason %s) loaded on %s, %s%s",
                manifest.name, manifest.version, manifest.reason, det.provider, det.precision,
                f", in shared graph {det.graph}" if det.graph else "",
            )  # fmt: skip
            metrics.MODEL_INFO.labels(model=manifest.name, version=manifest.version, provider=det.provider).set(1)
            loaded.append(det)
        if not loaded:
            if require:
                raise RuntimeError(
                    f"detectors.models_dir: no detector (<name>/manifest.json) under {models_dir} (set "
                    "detectors.require: false to run on metadata rules only)"
                )
            log.warning("no detectors found under %s: only metadata rules will be applied", models_dir)
        return cls(loaded)

    def describe(self) -> list[dict[str, str]]:
        out = []
        for d in self.detectors:
            row = {"name": d.name, "version": d.manifest.version, "provider": d.provider, "precision": d.precision}
            if d.graph:
                row["graph"] = d.graph
            out.append(row)
        return out

    def prepare(self, pixels: np.ndarray) -> dict[PreprocessSpec, np.ndarray]:
        """One decoded film -> its input tensor for every distinct spec (timed per model).

        The resize (the costly part on a DX-sized film) is done once per (size, resize) and shared by specs that only
        differ in normalisation; the result is exactly :func:`filmgate.preprocess.preprocess` for each spec.
        """
        out = {}
        squares: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None, float]] = {}
        for spec in self.specs:
            t0 = time.perf_counter()
            key = (spec.size, spec.resize)
            if key not in squares:
                square, mask = fit_square(pixels, spec.size, spec.resize)
                squares[key] = (square, mask, time.perf_counter() - t0)
                t0 = time.perf_counter()
            square, mask, resize_time = squares[key]
            out[spec] = normalize(square, mask, spec.normalize)[None, :, :]
            elapsed = time.perf_counter() - t0 + resize_time
            for name in self._models_of_spec[spec]:
                metrics.PREPROCESS_SECONDS.labels(model=name).observe(elapsed)
        return out

    def run(self, inputs: Sequence[dict[PreprocessSpec, np.ndarray]]) -> list[list[Finding]]:
        """Run every detector on a batch of prepared films; returns the findings per film (in detector order).

        Each distinct session runs once: a graph shared by several detectors gets all its inputs and returns every
        member's output in one ``session.run``; its time is shared among them in the inference metric."""
        results: list[list[Finding]] = [[] for _ in inputs]
        if not inputs:
            return results
        found: dict[str, list[Finding]] = {}
        for group in self.sessions:
            first = group[0]
            feeds = {name: np.stack([item[spec] for item in inputs]).astype(np.float32, copy=False)
                     for name, spec in first.inputs.items()}  # fmt: skip
            t0 = time.perf_counter()
            outs = first.session.run([d.output_name for d in group], feeds)  # type: ignore[attr-defined]
            per_film = (time.perf_counter() - t0) / len(inputs) / len(group)
            for det, out in zip(group, outs, strict=True):
                found[det.name] = det.manifest.findings(out)
                hist = metrics.INFERENCE_SECONDS.labels(model=det.name)
                for _ in inputs:
                    hist.observe(per_film)
        for det in self.detectors:
            for i, f in enumerate(found[det.name]):
                results[i].append(f)
        return results
