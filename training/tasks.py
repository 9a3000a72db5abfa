"""The task registry: what a detector learns, from which films, and how its labels are made.

A task is everything that differs between detectors; the training loop, evaluation and export are shared. Two
families exist:

- :class:`SyntheticTask` (self-supervised): labels are made by transforming good films (rotate, invert, mirror).
  The transform runs on the decoded [0, 1] film *between* the film augmentations (which turn with the film) and the
  display augmentations (which every class gets alike), so the label is the only thing that tells classes apart.
  Evaluation shows each val film in every variant; variant 0 is the film as it came (the "unaltered" film).
- :class:`LabelledTask`: labels come from ``labels.csv`` (kind, pediatric, ...) through ``label_of``; films are
  augmented but not transformed; evaluation shows each film once, as it came.

Both give ``classifier`` detectors (logits over ``labels``; score = softmax mass of ``positive_labels``, the same rule
as :meth:`filmgate.manifest.ModelManifest.scores`). A ``score`` detector (one number per film, e.g. an
out-of-distribution distance) subclasses :class:`Task` with ``kind = "score"``, ``num_outputs = 1`` and its own
:meth:`Task.loss`. Register a new task with :func:`register`; the YAML config names it by ``task:``.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from filmgate.typed_config import ConfigError
from filmgate_training.augment import display_augment, film_augment
from filmgate_training.datasets import LabelledFilm
from filmgate_training.films import film_id

if TYPE_CHECKING:  # annotations only: the config imports this registry (to check ``task:``), not the other way
    from filmgate_training.config import AugmentConfig


@dataclass(frozen=True)
class Example:
    """One model input before preprocessing: pixels in [0, 1], the class index and what variant it is."""

    variant: str
    pixels: np.ndarray
    label: int
    # A regression task's training target (an interval, e.g. (low, high) in its own units) instead of the class:
    # make_batch then gives float targets of shape (B, len(target)) to :meth:`Task.loss`.
    target: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CardText:
    """A detector's own words for its model card (:func:`filmgate_training.detectors.cards.classifier_card`).

    Every text is a template (``str.format``): ``{name}`` or ``{name:.1%}`` is filled from :meth:`Task.card_figures`,
    which reads the figures from the evaluation JSON (``evaluation.json``, ``extra.json``), so no measured figure is
    written in prose and none goes stale on retraining. What one *version* learnt (a comparison, an earlier version's
    figures) belongs in its config's ``card_limits``, next to the version it describes.
    """

    purpose: str
    data: str
    measured: str
    limits: tuple[str, ...] = ()
    method: str = ""  # a score detector's "How it works" (:func:`filmgate_training.detectors.cards.score_card`)

    def fill(self, text: str, figures: Mapping[str, Any]) -> str:
        return text.format_map(dict(figures))


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    positive_labels: tuple[str, ...]
    reason: str
    description: str
    film_kinds: tuple[str, ...] = ("frontal-chest",)
    film_filter: Callable[[LabelledFilm], bool] | None = None
    kind: str = "classifier"
    # A two-label task whose labels swap when the film is mirrored left-right (``flip``): its exported model may score
    # the film and its mirror image and be exactly consistent (``model.mirror_swap``,
    # filmgate_training.model.MirrorSwap).
    mirror_pair: bool = False
    # The kinds of film the gate uses this detector's verdict on, when narrower than what it trains on: val figures
    # (and so the manifest's per-source metrics) cover these kinds; the rest is reported by the detector's extra
    # evaluation. None: every kind it trains on.
    val_kinds: tuple[str, ...] | None = None
    # The detector's own card text (templates filled by :meth:`card_figures`); None: the framework's card
    # (:mod:`filmgate_training.card`, self-supervised orientation/inversion).
    card: CardText | None = None
    # Labels that are neither clean films nor faults for the leave-one-source-out aggregates (reported per class
    # only): e.g. ``pediatric``'s children of 10-17, whom the policy's cut of 10 years neither must catch nor spare.
    ignored_labels: tuple[str, ...] = ()
    # A threshold fixed by the task (in :meth:`scores` units) instead of one calibrated on held-out films: the age
    # model's is the policy's cut, the same for the header and the image.
    fixed_threshold: float | None = None

    # ------------------------------------------------------------------ which films
    def films(self, rows: Sequence[LabelledFilm], split: str) -> list[LabelledFilm]:
        """The films of ``split`` this task trains or evaluates on."""
        return [
            r
            for r in rows
            if r.split == split
            and r.kind in self.film_kinds
            and (self.film_filter is None or self.film_filter(r))
            and self.label_of(r) is not None
        ]

    def label_of(self, film: LabelledFilm) -> int | None:
        """The film's own class (None = not usable); synthetic tasks use every film."""
        return 0

    # ------------------------------------------------------------------ the steps of ``all``
    # Every detector is built by the same four steps (:mod:`filmgate_training.steps`: fit -> export with the parity
    # check -> evaluate on the ONNX file -> ship through the one manifest and install); a task changes what a step
    # does only through these hooks, whose default (None) is the framework's.

    def fit(self, config: Any, **options: Any) -> Any:
        """Hook: a task without a training loop (``atypical``: a distance on the shipped view network) fits here and
        writes its run folder (what :meth:`load_run` reads); None (the default): the shared training loop
        (:func:`filmgate_training.train.fit`)."""
        return None

    def load_run(self, config: Any) -> tuple[Any, dict[str, Any]] | None:
        """Hook: (network, metadata) of the fitted run for export and the manifest, when :meth:`fit` is the task's
        own; None (the default): :func:`filmgate_training.train.load_trained`."""
        return None

    def evaluation(self, config: Any, runner: Any) -> dict[str, Any] | None:
        """Hook: the val report of a task whose threshold and figures are not the framework's (``atypical``: the
        threshold its fit chose; films flagged per kind and source, synthetic wrong films, the most atypical films),
        through the exported ONNX file (``runner``). The framework adds the common keys (detector, version, created,
        the survey of the real DICOM files, the model's sha256). None (the default): the framework's calibration on
        held-out train films and its per-source report (:func:`filmgate_training.evaluate.evaluate`)."""
        return None

    def manifest_metrics(self, report: Mapping[str, Any]) -> dict[str, Any] | None:
        """Hook: the manifest's ``metrics`` from this task's evaluation report; None (the default): the framework's
        (pooled and per-source accuracy, AUC, recall, unaltered films flagged)."""
        return None

    def manifest_extra(self, blob: Mapping[str, Any]) -> dict[str, Any] | None:
        """Hook: how the model was made, for the manifest's ``extra`` (from :meth:`load_run`'s metadata); None (the
        default): the training loop's (architecture, parameters, steps, time, device)."""
        return None

    @property
    def own_fit(self) -> bool:
        return type(self).fit is not Task.fit

    # ------------------------------------------------------------------ reports and the card
    def report_markdown(self, report: Mapping[str, Any]) -> str | None:
        """Hook: ``evaluation.md`` from the evaluation report, for a task whose report is not the framework's
        (``atypical``: by kind, synthetic wrong films); None (the default): the framework's."""
        return None

    def extra_evaluation(self, config: Any, runner: Any, threshold: float) -> dict[str, Any] | None:
        """Hook: evaluation beyond the shared report, through the shipped ONNX file (``runner``) at its
        ``threshold``; ``finish`` writes it to ``extra.json`` and :meth:`extra_markdown` to ``extra.md``. None (the
        default): the task has none, and ``finish`` says so."""
        return None

    def extra_markdown(self, extra: Mapping[str, Any]) -> str:
        """Hook: the body of ``extra.md`` (Markdown, after its title) from :meth:`extra_evaluation`'s result."""
        return ""

    def headline(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """Hook: the figures of the extra evaluation that ``finish`` adds to the manifest's ``metrics.extra``."""
        return {}

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        """Hook: the named figures :attr:`card`'s templates use, read from ``report`` (evaluation.json) and
        ``extra`` (extra.json) and from the task's own code (e.g. class shares), never written in prose."""
        return {}

    def fit_fold(self, config: Any) -> tuple[Any, float, str]:
        """Hook for score tasks without a training loop: (network, threshold, how) for a leave-one-source-out fold
        of ``config`` (which leaves the source out in ``data.exclude_sources``)."""
        raise NotImplementedError(f"task {self.name}: a score task needs fit_fold for leave-one-source-out")

    def for_held_out(self) -> Task:
        """Hook: the task as leave-one-source-out scores a hospital it never saw (:mod:`filmgate_training.loso`);
        e.g. ``pediatric`` counts frontal films without a recorded age as presumed adults there, since clean films
        of unknown age are what the gate must accept. Default: the task itself."""
        return self

    def sample_weights(self, films: Sequence[LabelledFilm], weights: np.ndarray) -> np.ndarray:
        """Hook: reweight the source-balanced sampling probabilities (per film, summing to 1).

        By default, a task with a ``class_share()`` method (``{label: share}``) gets each label's films that share of
        the samples, source balance kept within a label; override for anything else.
        """
        share_fn = getattr(self, "class_share", None)
        if share_fn is None:
            return weights
        share = dict(share_fn())
        names = np.array([self.labels[cast(int, self.label_of(f))] for f in films], dtype=np.object_)  # all labelled
        present = {n: v for n, v in share.items() if (names == n).any()}
        total = sum(present.values())
        out = np.zeros(len(films), dtype=np.float64)
        for n, v in present.items():
            m = names == n
            out[m] = weights[m] / weights[m].sum() * (v / total)
        return out / out.sum() if out.sum() > 0 else weights

    # ------------------------------------------------------------------ examples
    def train_example(
        self, pixels: np.ndarray, film: LabelledFilm, rng: np.random.Generator, aug: AugmentConfig
    ) -> Example:
        raise NotImplementedError

    def eval_examples(self, pixels: np.ndarray, film: LabelledFilm) -> list[Example]:
        raise NotImplementedError

    # ------------------------------------------------------------------ model head and scoring
    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.kind == "classifier" else 1

    @property
    def positive_index(self) -> list[int]:
        return [self.labels.index(p) for p in self.positive_labels]

    def serving_model(self, net: Any, mirror_swap: bool = False) -> Any:
        """The module that is exported and evaluated: the trained network, or a wrapper around it."""
        if not mirror_swap:
            return net
        if not self.mirror_pair:
            raise ConfigError(f"model.mirror_swap: task {self.name} has no labels that swap under mirroring")
        from filmgate_training.model import MirrorSwap

        return MirrorSwap(net)

    def is_positive(self, label: int) -> bool:
        return self.labels[label] in self.positive_labels

    def loss(self, outputs: Any, labels: Any) -> Any:
        """Training loss on a batch (torch tensors); cross-entropy for classifiers."""
        import torch.nn.functional as F  # noqa: N812

        return F.cross_entropy(outputs, labels)

    def manifest_threshold(self, threshold: float) -> float:
        """Hook: the manifest's threshold for a threshold in :meth:`scores` units (the same, except for ``age``)."""
        return threshold

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Raw outputs -> the score thresholds compare with (same rule as the gate's manifest)."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.kind == "score":
            return outputs.reshape(len(outputs), -1)[:, 0]
        z = outputs - outputs.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p[:, self.positive_index].sum(axis=1)


@dataclass(frozen=True)
class SyntheticTask(Task):
    """Labels made by transforming good films; ``transforms[i]`` makes class ``labels[i]`` (index 0: identity)."""

    transforms: tuple[Callable[[np.ndarray], np.ndarray], ...] = ()
    # Faults of *other* detectors, applied to a share of training films of every class so that this detector's
    # answer does not depend on them (an upside-down film is not "inverted"; an inverted one is not "rotated").
    nuisance: tuple[Callable[[np.ndarray], np.ndarray], ...] = ()
    nuisance_p: float = 0.0

    def train_example(
        self, pixels: np.ndarray, film: LabelledFilm, rng: np.random.Generator, aug: AugmentConfig
    ) -> Example:
        label = int(rng.integers(len(self.labels)))
        img = film_augment(pixels, rng, aug)
        img = np.ascontiguousarray(self.transforms[label](img))
        if self.nuisance and rng.random() < self.nuisance_p:
            img = np.ascontiguousarray(self.nuisance[int(rng.integers(len(self.nuisance)))](img))
        img = display_augment(img, rng, aug)
        return Example(self.labels[label], img, label)

    def eval_examples(self, pixels: np.ndarray, film: LabelledFilm) -> list[Example]:
        return [
            Example(name, np.ascontiguousarray(fn(pixels)), i)
            for i, (name, fn) in enumerate(zip(self.labels, self.transforms, strict=True))
        ]


@dataclass(frozen=True)
class LabelledTask(Task):
    """Labels read from the film's row by ``label_fn`` (returns a label name, or None to leave the film out)."""

    label_fn: Callable[[LabelledFilm], str | None] = field(default=lambda film: None)

    def label_of(self, film: LabelledFilm) -> int | None:
        name = self.label_fn(film)
        return None if name is None else self.labels.index(name)

    def train_example(
        self, pixels: np.ndarray, film: LabelledFilm, rng: np.random.Generator, aug: AugmentConfig
    ) -> Example:
        label = self.label_of(film)
        assert label is not None
        img = display_augment(film_augment(pixels, rng, aug), rng, aug)
        return Example(self.labels[label], img, label)

    def eval_examples(self, pixels: np.ndarray, film: LabelledFilm) -> list[Example]:
        label = self.label_of(film)
        assert label is not None
        return [Example("as-is", pixels, label)]


# ---------------------------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {}


def register(task: Task, key: str | None = None) -> Task:
    """Add a task under ``key`` (the config's ``task:``; default its name). Two keys may name tasks of one name:
    variants of a detector (``pediatric``: the classifier and the age model) that ship to the same ``models/`` folder
    and share one leave-one-source-out report, so the report compares them."""
    if task.kind not in ("classifier", "score", "age"):
        raise ValueError(f"task {task.name}: kind must be classifier, score or age")
    if task.kind != "score" and not set(task.positive_labels) <= set(task.labels):
        raise ValueError(f"task {task.name}: positive_labels must be among labels")
    TASKS[key or task.name] = task
    return task


PLUGINS = "filmgate_training.detectors"


def _load_plugins() -> None:
    """Import every module directly under ``filmgate_training.detectors`` (``training/detectors/*.py``): a task's
    module registers it with :func:`register` when imported, so a new detector is one new file there and no list is
    kept by hand. Modules whose name starts with ``_`` are skipped."""
    package = importlib.import_module(PLUGINS)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{PLUGINS}.{info.name}")


def get_task(name: str) -> Task:
    if name not in TASKS:
        _load_plugins()
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r}; registered: {sorted(TASKS)} (see training/tasks.py)")
    return TASKS[name]


def in_holdout(film: LabelledFilm, fraction: float, salt: str = "calibration") -> bool:
    """Deterministic patient-grouped holdout of the train split (for threshold calibration, never trained on)."""
    key = film.patient or film_id(film)
    h = int.from_bytes(hashlib.sha1(f"{salt}:{film.source}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def registered() -> Mapping[str, Task]:
    _load_plugins()
    return dict(TASKS)
