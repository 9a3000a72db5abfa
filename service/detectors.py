"""The detectors: every model folder under ``models/`` is loaded once, run in batches, and read via its manifest.

A new detector (flip, view, pediatric, atypical) needs no code here: its manifest says how to preprocess, how to
score and which quarantine reason it raises. Films are preprocessed once per distinct preprocessing spec, so models
that share one (most do) share the work. onnxruntime-gpu silently falls back to CPU, so the provider really in use
is read back from the session, logged and exported as ``filmgate_model_info``.

A manifest may name an int8 copy of its model for the CPU provider (``quantized``): the gate runs it there and the
float model on CUDA (``ModelManifest.file_for``; ``detectors.precision: fp32`` keeps the float model everywhere).
Which file runs is chosen from the provider really in use, so a CUDA build that falls back to CPU runs int8 too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filmgate import metrics
from filmgate.config import DetectorsConfig
from filmgate.manifest import Finding, ModelManifest, discover, resolve_models_dir
from filmgate.preprocess import PreprocessSpec, fit_square, normalize

log = logging.getLogger("filmgate.detectors")


@dataclass
class OnnxDetector:
    """One ONNX model and its manifest."""

    manifest: ModelManifest
    folder: Path
    session: object
    provider: str
    precision: str = "fp32"  # of the file that runs: "int8" (the manifest's quantized model) or "fp32"

    @property
    def name(self) -> str:
        return self.manifest.name

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw outputs for a prepared (N, 1, S, S) batch."""
        m = self.manifest
        return self.session.run([m.output_name], {m.input_name: batch})[0]  # type: ignore[attr-defined,no-any-return]

    def run(self, batch: np.ndarray) -> list[Finding]:
        return self.manifest.findings(self.outputs(batch))


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


def _onnx_factory(folder: Path, manifest: ModelManifest, cfg: DetectorsConfig) -> OnnxDetector:
    cpu = "CPUExecutionProvider"
    wanted = cpu if _providers(cfg.provider)[0] == cpu else "CUDAExecutionProvider"
    file, precision = manifest.file_for(wanted, cfg.precision)
    session = onnx_session(folder / file, provider=cfg.provider, intra_op_threads=cfg.intra_op_threads)
    used = session.get_providers()[0]
    if cfg.provider == "cuda" and used != "CUDAExecutionProvider":
        raise RuntimeError(f"detectors.provider is cuda but {manifest.name} runs on {used} (no usable GPU)")
    if used != wanted and manifest.file_for(used, cfg.precision)[0] != file:  # CUDA fell back to CPU silently
        file, precision = manifest.file_for(used, cfg.precision)
        session = onnx_session(folder / file, provider="cpu", intra_op_threads=cfg.intra_op_threads)
    return OnnxDetector(manifest=manifest, folder=folder, session=session, provider=used, precision=precision)


# The detector registry: how a model file is run, by file suffix. ONNX is the only runtime today.
DETECTOR_FACTORIES: dict[str, Callable[[Path, ModelManifest, DetectorsConfig], OnnxDetector]] = {
    ".onnx": _onnx_factory,
}


def load_detector(folder: Path, manifest: ModelManifest, cfg: DetectorsConfig) -> OnnxDetector:
    """One detector from its folder, by the registry's runtime for its model file."""
    factory = DETECTOR_FACTORIES.get(Path(manifest.file).suffix.lower())
    if factory is None:
        raise RuntimeError(f"{folder}: no runtime for model file {manifest.file}")
    return factory(folder, manifest, cfg)


class DetectorSet:
    """All loaded detectors; preprocesses and runs them on batches of decoded films."""

    def __init__(self, detectors: Sequence[OnnxDetector]) -> None:
        self.detectors = list(detectors)
        self.specs: list[PreprocessSpec] = list(dict.fromkeys(d.manifest.preprocessing for d in self.detectors))
        self._models_of_spec = {
            s: [d.name for d in self.detectors if d.manifest.preprocessing == s] for s in self.specs
        }

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
        for folder, manifest in discover(models_dir):
            if manifest.name in cfg.disabled:
                log.info("detector %s disabled by detectors.disabled", manifest.name)
                continue
            det = load_detector(folder, manifest, cfg)
            log.info(
                "detector %s version %s (reason %s) loaded on %s, %s",
                manifest.name, manifest.version, manifest.reason, det.provider, det.precision,
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
        return [{"name": d.name, "version": d.manifest.version, "provider": d.provider, "precision": d.precision}
                for d in self.detectors]  # fmt: skip

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
        """Run every detector on a batch of prepared films; returns the findings per film."""
        results: list[list[Finding]] = [[] for _ in inputs]
        if not inputs:
            return results
        for det in self.detectors:
            batch = np.stack([item[det.manifest.preprocessing] for item in inputs]).astype(np.float32, copy=False)
            t0 = time.perf_counter()
            findings = det.run(batch)
            per_film = (time.perf_counter() - t0) / len(inputs)
            hist = metrics.INFERENCE_SECONDS.labels(model=det.name)
            for i, f in enumerate(findings):
                hist.observe(per_film)
                results[i].append(f)
        return results
