"""``atypical``: how unlike a clean frontal chest film is this film? One out-of-distribution score, inside the ONNX.

No labels exist for "wrong" films (heavily collimated or zoomed, washed out, nearly blank, screenshots, films of the
wrong thing that the other detectors miss), so this detector measures distance instead of learning classes:

1. the trained ``view`` network (which has learned what separates frontal chest films from everything else) gives
   pooled features at two depths;
2. five display statistics of the film as displayed (mean and spread of grey, share of near-white and near-black
   pixels, share of letterbox padding) add what a z-scored network cannot see: brightness, washed-out and blank
   films;
3. the score is the Mahalanobis distance of that vector to the frontal chest films of the train split (per-dimension
   standardised, covariance shrunk towards the identity), divided by the square root of its dimension.

The model takes the ``unit`` input (displayed grey, padding 0) and rebuilds the view network's ``zscore`` input
itself (padding = all-zero edge rows/columns), so the gate feeds it one tensor and reads one number. The threshold is
the quantile of held-out train frontal films chosen for the target rate (never val films).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.model import FilmNet
from training.tasks import Task, register

N_STATS = 5
MID_STAGE = 7  # FilmNet.features[:7] ends after the 128-wide residual block (widths 16, 32, 64, 128, 192)


class Atypicality(nn.Module):
    """(N, 1, S, S) ``unit`` films -> (N, 1) Mahalanobis distance to clean frontal chest films."""

    def __init__(self, backbone: FilmNet, mean: np.ndarray, scale: np.ndarray, whiten: np.ndarray):
        super().__init__()
        self.features = backbone.features
        self.mid = MID_STAGE
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("whiten", torch.as_tensor(whiten, dtype=torch.float32))

    @staticmethod
    def real_mask(x: torch.Tensor) -> torch.Tensor:
        """Letterbox padding is whole rows or columns of exact zeros; everything else is film."""
        rows = (x.amax(dim=3, keepdim=True) > 0).to(x.dtype)  # (N, 1, S, 1)
        cols = (x.amax(dim=2, keepdim=True) > 0).to(x.dtype)  # (N, 1, 1, S)
        return rows * cols

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.real_mask(x)
        n = mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        mean = (x * mask).sum(dim=(2, 3), keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / n
        std = var.sqrt()
        z = (x - mean) / std.clamp_min(1e-3) * mask  # the view network's zscore input, padding 0
        h = self.features[: self.mid](z)
        mid = h.mean(dim=(2, 3))
        last = self.features[self.mid :](h).mean(dim=(2, 3))
        stats = torch.cat(
            [
                mean.flatten(1),
                std.flatten(1),
                ((x > 0.95).to(x.dtype) * mask).sum(dim=(2, 3)) / n.flatten(1),
                ((x < 0.05).to(x.dtype) * mask).sum(dim=(2, 3)) / n.flatten(1),
                1.0 - n.flatten(1) / float(x.shape[2] * x.shape[3]),
            ],
            dim=1,
        )
        return torch.cat([mid, last, stats], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (self.embed(x) - self.mean) / self.scale
        w = v @ self.whiten
        return (w * w).sum(dim=1, keepdim=True).div(float(self.whiten.shape[1])).sqrt()


def fit_gaussian(emb: np.ndarray, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, per-dimension scale and a whitening matrix W (so that |(x - mean) / scale @ W|^2 is Mahalanobis)."""
    emb = np.asarray(emb, dtype=np.float64)
    mean = emb.mean(axis=0)
    scale = emb.std(axis=0)
    scale = np.where(scale < 1e-6, 1e-6, scale)
    v = (emb - mean) / scale
    cov = np.cov(v, rowvar=False)
    cov = (1.0 - shrink) * cov + shrink * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    whiten = np.linalg.cholesky(precision)  # precision = W W^T
    return mean.astype(np.float32), scale.astype(np.float32), whiten.astype(np.float32)


@dataclass(frozen=True)
class AtypicalTask(Task):
    """A ``score`` task built from the trained ``view`` run; see :mod:`training.detectors.atypical_build`."""

    backbone_task: str = "view"


TASK = register(
    AtypicalTask(
        name="atypical",
        labels=("typical", "atypical"),
        positive_labels=("atypical",),
        reason="atypical",
        description=(
            "How unlike a clean frontal chest film the film is: the Mahalanobis distance (per dimension) of the view "
            "network's features and five display statistics to the train split's frontal chest films."
        ),
        film_kinds=("frontal-chest",),
        kind="score",
    )
)
