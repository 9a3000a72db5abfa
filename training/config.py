"""The typed, frozen configuration of one training run, read from YAML (``training/configs/<task>.yaml``).

One file fully describes a detector: which task, how films are preprocessed (the same :class:`PreprocessSpec` the
gate reads from the manifest), the augmentation, the network, the optimiser schedule and how the threshold is
calibrated. Errors name the offending key and what is allowed, so a typo fails before a 20-minute run starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from filmgate.preprocess import PreprocessSpec
from filmgate.typed_config import ConfigError, build, read_yaml, with_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Exclusion:
    """A film whose row is wrong for this task (e.g. stored upside down): left out of training, calibration and the
    headline val figures; list it under ``evaluate.checks`` too, so the report shows what the detector says."""

    path: str  # relative to the data root
    why: str


@dataclass(frozen=True)
class FolderSource:
    """A folder of films (PNG, JPEG, DICOM; searched recursively) added to the rows of labels.csv."""

    path: str
    source: str
    kind: str = "frontal-chest"
    split: str = "train"
    licence: str = ""
    pediatric: str = ""  # yes (every film is a child's), no (an adult's), or "" (unknown): labels for `pediatric`

    def __post_init__(self) -> None:
        if self.pediatric not in ("yes", "no", ""):
            raise ValueError(f"pediatric must be yes, no or empty, got {self.pediatric!r}")


@dataclass(frozen=True)
class ReviewSource:
    """Corrections exported by a node's review console (``GET /api/labels.csv``, or a saved copy of it): the films a
    site's reviewers relabelled for this config's task join the training rows (see filmgate_training.review)."""

    labels: str  # a path, or the node's http(s)://.../api/labels.csv ($FILMGATE_REVIEW_AUTH = user:password)
    source: str = "site-review"  # the source name of these films in the pool, the manifest and the model card
    licence: str = "site"


@dataclass(frozen=True)
class DataConfig:
    """Which films, how they are cached and sampled."""

    cache_dir: str = "cache"  # relative to the repository root (git-ignored)
    cache_long_side: int = 192  # films are cached with their long side reduced to this (never enlarged)
    source_balance: float = 0.5  # a source's share of samples grows as n**source_balance (1 = as is, 0 = equal)
    calibration_fraction: float = 0.1  # of train patients held out to choose the threshold (never trained on)
    max_train_films: int | None = None  # cap (for smoke tests); None = all
    max_val_films: int | None = None
    workers: int = 2  # processes that decode films when the cache is built
    exclude: tuple[Exclusion, ...] = ()
    # sources left out of training and calibration altogether (leave-one-source-out folds: filmgate_training.loso)
    exclude_sources: tuple[str, ...] = ()
    folders: tuple[FolderSource, ...] = ()  # more films beyond labels.csv
    review: tuple[ReviewSource, ...] = ()  # relabelled films from review consoles (train split only)


@dataclass(frozen=True)
class AugmentConfig:
    """Realism augmentations: what real films vary in. Probabilities per sample; ranges symmetric where it fits."""

    p_tilt: float = 0.6
    tilt_degrees: float = 15.0
    p_crop: float = 0.6
    crop_min_side: float = 0.75  # a crop keeps at least this fraction of each side
    p_aspect: float = 0.5
    aspect_max: float = 1.35  # stretch one axis by up to this factor
    p_border: float = 0.25
    border_max: float = 0.12  # of the side
    p_collimation: float = 0.2
    p_text_film: float = 0.4  # markers burned into the film (they turn with it)
    p_text_overlay: float = 0.3  # text added after the label transform (stays upright, like a viewer overlay)
    p_gamma: float = 0.6
    gamma_max: float = 1.8  # gamma in [1/gamma_max, gamma_max]
    p_window: float = 0.5
    window_clip_max: float = 0.2  # fraction of the range cut at either end
    p_contrast: float = 0.3
    p_noise: float = 0.5
    noise_max: float = 0.04
    p_blur: float = 0.2
    p_pad: float = 0.2  # letterbox-like padding added by other software (black or white)
    # What other hospitals' copies went through (display side, so every class gets them alike; 0 = off, as every
    # detector trained before 2026-12-01 was): a low-resolution copy enlarged again by the gate (bimcv-covid19's
    # films are 224 px squares), JPEG recompression, and a film photographed or screenshotted from a viewer.
    p_low_res: float = 0.0
    low_res_min: int = 96  # the copy's long side (px), uniform in [low_res_min, low_res_max]
    low_res_max: int = 192
    p_jpeg: float = 0.0
    jpeg_quality_min: int = 40
    jpeg_quality_max: int = 95
    p_photo: float = 0.0  # perspective, vignette, soft focus, on a dark surround
    p_screenshot: float = 0.0  # the film inside a viewer window (dark canvas, tool bars, overlay text)


@dataclass(frozen=True)
class ModelConfig:
    """The small CNN (see :mod:`filmgate_training.model`)."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 192)
    dropout: float = 0.1
    # Export the network wrapped in filmgate_training.model.MirrorSwap (film and mirror image, logits
    # swapped and averaged):
    # exactly mirror-consistent at twice the cost; only for tasks whose labels swap under mirroring (flip).
    mirror_swap: bool = False


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2  # torch CPU threads (the build machine has 2 shared cores)
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    checkpoint_every: int = 250
    log_every: int = 50
    progress: bool = True
    # a run folder (or model.pt), or a shipped model.onnx, whose weights start this run (fine-tuning); "" = scratch
    init_from: str = ""


@dataclass(frozen=True)
class Check:
    """A real film whose outcome is known (e.g. a MONOCHROME1 chest film that must not be called inverted)."""

    path: str  # relative to the data root
    flagged: bool
    why: str = ""


@dataclass(frozen=True)
class EvaluateConfig:
    target_fpr: float = 0.001  # unaltered films flagged, on the calibration films
    min_threshold: float = 0.5
    # fpr: the smallest threshold meeting target_fpr (recall first). margin: for labelled tasks whose held-out films
    # hold both classes, the middle (in log-odds) of the gap between the highest negative score that target_fpr
    # allows and the lowest positive score, so that neither class sits on the threshold (falls back to fpr when the
    # classes overlap there).
    threshold_rule: str = "fpr"
    # When set (score detectors): the threshold chosen on held-out train films is raised by the factor that brings
    # the clean films of the hospitals each leave-one-source-out fold never saw to this false-flag rate, averaged
    # over those hospitals (filmgate_training.recalibrate.recalibration_factor; needs `loso --sources all` first).
    loso_target_fpr: float | None = None
    parity_films: int = 32  # real val films checked torch vs onnxruntime at export
    parity_tolerance: float = 1e-3  # max abs difference of logits
    checks: tuple[Check, ...] = ()

    def __post_init__(self) -> None:
        if self.threshold_rule not in ("fpr", "margin"):
            raise ValueError(f"threshold_rule must be fpr or margin, got {self.threshold_rule!r}")


@dataclass(frozen=True)
class Config:
    task: str
    version: str = "0.1.0"
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # for the model card, in the config's own words: which choices looked at val (the guide asks every card to say)
    val_notes: tuple[str, ...] = ()
    card_limits: tuple[str, ...] = ()  # this version's own known limits, listed first in the model card
    run_dir: str = ""  # default runs/<task>
    models_dir: str = "models"

    @property
    def run_path(self) -> Path:
        return _repo_path(self.run_dir or f"runs/{self.task}")

    @property
    def cache_path(self) -> Path:
        return _repo_path(self.data.cache_dir)

    @property
    def models_path(self) -> Path:
        return _repo_path(self.models_dir)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["preprocessing"] = self.preprocessing.to_dict()
        return out


def _repo_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def config_from_dict(data: Mapping[str, Any]) -> Config:
    config = build(Config, data)
    from filmgate_training.tasks import get_task  # late import: tasks import heavy modules

    get_task(config.task)  # unknown task names fail here, naming the registered ones
    return config


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML config; ``overrides`` maps dotted keys (``train.steps``) to values, e.g. from ``--set``."""
    path = Path(path)
    if not path.is_file():
        candidate = REPO_ROOT / "training" / "configs" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"config file {path} not found (nor {candidate})")
        path = candidate
    data = with_overrides(read_yaml(path), overrides or {})  # the gate's config is read by the same reader
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs (values in YAML: ``train.steps=100``) -> the ``overrides`` of :func:`load_config`."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
