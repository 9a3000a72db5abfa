"""The leave-one-source-out recalibration of a detector's threshold (``evaluate.loso_target_fpr``), from the fold
scores :mod:`filmgate_training.loso` wrote. Its own module because both the LOSO runner and the atypical build use
it, and the runner also builds atypical folds: here neither imports the other.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from filmgate_training.config import Config

MIN_FILMS = 20  # a source with fewer films of the task is not a fold (its interval would say nothing)


def recalibration_factor(config: Config, target: float, min_films: int = MIN_FILMS) -> dict[str, Any]:
    """The factor on a fold's own threshold that brings the clean films of the hospitals it never saw to ``target``
    false flags, averaged over held-out sources (each source counts once, however many films it has).

    Each fold's threshold was chosen on its own held-out train films (the rule the full build uses); the clean
    held-out films' scores over that threshold say how much higher a hospital the model never saw scores. The full
    model's threshold times this factor is the leave-one-source-out recalibration (``evaluate.loso_target_fpr``).
    Needs ``scores.json`` of folds (``python -m filmgate_training loso --sources all``); val plays no part.
    """
    ratios: dict[str, np.ndarray] = {}
    for path in sorted((config.run_path / "loso").glob("*/scores.json")):
        d = json.loads(path.read_text())
        if len(d["clean"]) >= min_films:
            ratios[d["source"]] = np.asarray(d["clean"], dtype=np.float64) / float(d["threshold"])
    if not ratios:
        raise FileNotFoundError(f"{config.run_path / 'loso'}: no fold scores; run `loso --sources all` first")

    def mean_rate(m: float) -> float:
        return float(np.mean([(r >= m).mean() for r in ratios.values()]))

    candidates = np.unique(np.concatenate([[1.0], *ratios.values()]))
    candidates = np.nextafter(candidates[candidates >= 1.0], np.inf)
    factor = next((float(m) for m in np.concatenate([[1.0], candidates]) if mean_rate(m) <= target), 1.0)
    per_source = {s: float((r >= factor).mean()) for s, r in ratios.items()}
    return {"factor": factor, "target": target, "sources": sorted(ratios), "mean_rate_at_1": mean_rate(1.0),
            "mean_rate": mean_rate(factor), "per_source": per_source}  # fmt: skip
