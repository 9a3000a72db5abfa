"""Evaluation numbers like Oakden-Rayner (2018) (AUC, accuracy, precision, recall) plus the false-positive rate on
unaltered films, in plain numpy so that the gate's test environment needs nothing more."""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None when a class is absent."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def choose_threshold(negative_scores: np.ndarray, target_fpr: float, floor: float) -> float:
    """The smallest threshold (>= ``floor``) that flags at most ``target_fpr`` of these unaltered films."""
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if len(neg) == 0:
        return floor
    allowed = int(np.floor(target_fpr * len(neg)))
    if allowed >= len(neg):
        return floor
    above = neg[allowed]  # the highest score that must not be flagged
    return float(max(floor, np.nextafter(above, np.inf)))


def margin_threshold(
    negative_scores: np.ndarray, positive_scores: np.ndarray, target_fpr: float, floor: float
) -> tuple[float, str]:
    """The middle, in log-odds, of the gap between what :func:`choose_threshold` allows and the lowest positive.

    A threshold at the very edge of the negatives (the ``fpr`` rule) keeps recall but holds back every good film that
    scores a little higher than the calibration films did, and the calibration set of a rare source is small. When the
    held-out positives leave room above that edge, the threshold moves to the middle of the room. Returns the
    threshold and which rule set it.
    """
    low = choose_threshold(negative_scores, target_fpr, floor)
    pos = np.asarray(positive_scores, dtype=np.float64)
    if len(pos) == 0 or pos.min() <= low:
        return low, "fpr"
    high = float(pos.min())
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    lo, hi = np.clip([low, high], 1e-6, 1 - 1e-6)
    return float(1 / (1 + np.exp(-(logit(lo) + logit(hi)) / 2))), "margin"


def summarise(
    labels: np.ndarray,
    predicted: np.ndarray | None,
    scores: np.ndarray,
    positive: np.ndarray,
    threshold: float,
    n_classes: int,
) -> dict[str, Any]:
    """All the numbers for one group of examples (pooled, or one source)."""
    flagged = scores >= threshold
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    fn = int((~flagged & positive).sum())
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    out: dict[str, Any] = {
        "examples": int(len(labels)),
        "auc": roc_auc(positive, scores),
        "detection_accuracy": float((flagged == positive).mean()) if len(labels) else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / n_pos if n_pos else None,
        "fpr_unaltered": fp / n_neg if n_neg else None,
        "flagged_unaltered": fp,
        "unaltered": n_neg,
        "missed": fn,
    }
    if predicted is not None:
        out["accuracy"] = float((predicted == labels).mean()) if len(labels) else None
        cm = np.zeros((n_classes, n_classes), dtype=int)
        np.add.at(cm, (labels, predicted), 1)
        out["confusion"] = cm.tolist()
    else:
        out["accuracy"] = out["detection_accuracy"]
    return out


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n ((0, 1) when n is 0): honest at 0/n and n/n, unlike the normal one."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
