"""Films for a task: the training pool (cached, source-balanced) and the exact serving path for evaluation.

Training reads reduced films from :mod:`filmgate_training.cache` and builds each input with the gate's own
:func:`filmgate.preprocess.preprocess`. Evaluation does not use the cache at all: it decodes every film with
:func:`filmgate.decode.decode_file`, applies the task's variant, and preprocesses, exactly as the gate would see it.

Sampling balances sources: a source with ``n`` films gets a share proportional to ``n ** source_balance``, so the
4,600 pediatric 224-px ``kermany`` copies do not drown the few hundred adult films of each other hospital.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from filmgate.decode import DecodeError, decode_file
from filmgate.preprocess import PreprocessSpec, preprocess
from filmgate_training.augment import display_augment, film_augment
from filmgate_training.cache import FilmCache, build_cache
from filmgate_training.config import AugmentConfig, Config
from filmgate_training.datasets import LabelledFilm
from filmgate_training.films import all_rows, film_id
from filmgate_training.review import review_rows
from filmgate_training.tasks import Example, Task, in_holdout


@dataclass
class TrainingPool:
    films: list[LabelledFilm]
    cache: FilmCache
    cache_index: np.ndarray  # film i -> cache row
    weights: np.ndarray  # sampling probability per film (sums to 1)

    def sources(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(f.source for f in self.films).items()))


def _stable_order(films: Sequence[LabelledFilm]) -> list[LabelledFilm]:
    return sorted(films, key=lambda f: hashlib.sha1(film_id(f).encode()).hexdigest())


def cap(films: Sequence[LabelledFilm], limit: int | None) -> list[LabelledFilm]:
    """At most ``limit`` films, taken round-robin over sources in a fixed order (so small caps still mix sources)."""
    if limit is None or len(films) <= limit:
        return list(films)
    by_source: dict[str, list[LabelledFilm]] = collections.defaultdict(list)
    for f in _stable_order(films):
        by_source[f.source].append(f)
    out: list[LabelledFilm] = []
    queues = [by_source[s] for s in sorted(by_source)]
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def source_weights(films: Sequence[LabelledFilm], balance: float) -> np.ndarray:
    counts = collections.Counter(f.source for f in films)
    w = np.array([counts[f.source] ** balance / counts[f.source] for f in films], dtype=np.float64)
    return w / w.sum()


def split_train(config: Config, task: Task) -> tuple[list[LabelledFilm], list[LabelledFilm]]:
    """The task's train-split films, as (trained on, held out for calibration). The review console's corrections
    (``data.review``) are never capped by ``max_train_films``: they are what a site fine-tunes on."""
    films = _without_exclusions(config, task.films(all_rows(config.data.folders), "train"))
    site = _without_exclusions(config, task.films(review_rows(config.data.review, task), "train"))
    frac = config.data.calibration_fraction
    train = [f for f in films if not in_holdout(f, frac)]
    calib = [f for f in films if in_holdout(f, frac)]
    limit = config.data.max_train_films
    train, calib = cap(train, limit), cap(calib, None if limit is None else max(8, limit // 4))
    return train + [f for f in site if not in_holdout(f, frac)], calib + [f for f in site if in_holdout(f, frac)]


def val_films(config: Config, task: Task) -> list[LabelledFilm]:
    films = task.films(all_rows(config.data.folders), "val")
    if task.val_kinds is not None:
        films = [f for f in films if f.kind in task.val_kinds]
    return cap(_without_exclusions(config, films), config.data.max_val_films)


def _without_exclusions(config: Config, films: Sequence[LabelledFilm]) -> list[LabelledFilm]:
    excluded = {e.path for e in config.data.exclude}
    sources = set(config.data.exclude_sources)
    return [f for f in films if film_id(f) not in excluded and f.source not in sources]


def training_pool(config: Config, task: Task, films: Sequence[LabelledFilm], progress: bool = False) -> TrainingPool:
    cache = build_cache(films, config.data.cache_long_side, config.cache_path, config.data.workers, progress)
    where = cache.index()
    kept = [f for f in films if film_id(f) in where]
    idx = np.array([where[film_id(f)] for f in kept], dtype=np.int64)
    weights = task.sample_weights(kept, source_weights(kept, config.data.source_balance))
    return TrainingPool(kept, cache, idx, weights)


def make_batch(
    pool: TrainingPool, task: Task, config: Config, rng: np.random.Generator, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of augmented, labelled, preprocessed examples: (B, 1, S, S) float32 and the targets (classes (B,)
    int64, or (B, K) float32 for a task whose examples carry a ``target``)."""
    spec = config.preprocessing
    picks = rng.choice(len(pool.films), size=batch_size, p=pool.weights)
    x = np.empty((batch_size, 1, spec.size, spec.size), dtype=np.float32)
    targets: list[int | tuple[float, ...]] = []
    for j, i in enumerate(picks):
        film = pool.films[i]
        ex = task.train_example(pool.cache.image(int(pool.cache_index[i])), film, rng, config.augment)
        x[j] = preprocess(ex.pixels, spec)
        targets.append(ex.label if ex.target is None else ex.target)
    # classes (B,) int64, or a regression task's targets (B, K) float32 (Example.target)
    y = np.asarray(targets, dtype=np.float32 if isinstance(targets[0], tuple) else np.int64)
    return x, y


@dataclass(frozen=True)
class EvalItem:
    film: LabelledFilm
    variant: str
    label: int
    input: np.ndarray  # (1, S, S); (C, S, S) for several specs (:func:`prepare`)


Specs = PreprocessSpec | tuple[PreprocessSpec, ...]  # several: a graph with several inputs (filmgate.manifest.graph)


def prepare(pixels: np.ndarray, spec: Specs) -> np.ndarray:
    """A film's model input (1, S, S) as the gate prepares it; for several specs of one size their inputs stacked as
    channels (C, S, S), in order: what a shared graph's inputs and its members' own models are fed from."""
    if isinstance(spec, PreprocessSpec):
        return preprocess(pixels, spec)
    return np.concatenate([preprocess(pixels, s) for s in spec])


def eval_items(
    films: Sequence[LabelledFilm],
    task: Task,
    spec: Specs,
    augment: AugmentConfig | None = None,
    seed: int = 0,
) -> Iterator[EvalItem | tuple[LabelledFilm, str]]:
    """Every variant of every film through the serving path; undecodable films are yielded as (film, error).

    With ``augment``, each film also gets the realism augmentations (film ones before the variant, display ones
    after), from a generator seeded by ``seed`` and the film's path: a fixed, harder copy of val that shows how
    the detector copes with tilts, crops, borders, text and re-windowing it has not seen on these films.
    """
    for film in films:
        try:
            pixels = decode_file(film.path).pixels
        except DecodeError as exc:
            yield film, str(exc)
            continue
        rng = None
        if augment is not None:
            key = int.from_bytes(hashlib.sha1(film_id(film).encode()).digest()[:8], "big")
            rng = np.random.default_rng([seed, key])
            pixels = film_augment(pixels, rng, augment)
        examples: list[Example] = task.eval_examples(pixels, film)
        for ex in examples:
            img = ex.pixels if rng is None or augment is None else display_augment(
                np.ascontiguousarray(ex.pixels), rng, augment
            )
            yield EvalItem(film, ex.variant, ex.label, prepare(img, spec))
