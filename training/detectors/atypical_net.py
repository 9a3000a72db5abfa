"""The ``atypical`` network: how unlike a clean frontal chest film is a film? One distance, inside the ONNX.

No labels exist for "wrong" films (heavily collimated or zoomed, washed out, nearly blank, screenshots, films of the
wrong thing that the other detectors miss), so this detector measures distance instead of learning classes:

1. the trained ``view`` network (which has learned what separates frontal chest films from everything else) gives
   pooled features at two depths;
2. five display statistics of the film as displayed (mean and log spread of grey, share of near-white and near-black
   pixels, share of letterbox padding) add what a z-scored network cannot see: brightness, washed-out and blank
   films;
3. two Mahalanobis distances to the frontal chest films of the train split (per-dimension standardised, covariance
   shrunk towards the identity, divided by the square root of the dimension): one over the content features, one
   over the display statistics (kept apart so that 5 display numbers are not drowned by 320 features); each is
   expressed in units of its own calibration quantile and the score is the larger of the two.

The model takes the ``unit`` input (displayed grey, padding 0) and rebuilds the view network's ``zscore`` input
itself (padding = all-zero edge rows/columns), so the gate feeds it one tensor and reads one number. The threshold is
the quantile of held-out train frontal films chosen for the target rate (never val films).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from filmgate_training.model import FilmNet

N_STATS = 5
MID_STAGE = 7  # FilmNet.features[:7] ends after the 128-wide residual block (widths 16, 32, 64, 128, 192)


class Atypicality(nn.Module):
    """(N, 1, S, S) ``unit`` films -> (N, 1): max of the content and display distances, each in units of its own
    calibration quantile (so 1.0 means "as unusual as the rarest 0.5% of held-out frontal films" in either)."""

    mean: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    scale: torch.Tensor
    whiten_content: torch.Tensor
    whiten_display: torch.Tensor

    def __init__(
        self,
        backbone: FilmNet,
        mean: np.ndarray,
        scale: np.ndarray,
        whiten_content: np.ndarray,
        whiten_display: np.ndarray,
        unit_content: float = 1.0,
        unit_display: float = 1.0,
    ):
        super().__init__()
        self.features = backbone.features
        self.mid = MID_STAGE
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("whiten_content", torch.as_tensor(whiten_content, dtype=torch.float32))
        self.register_buffer("whiten_display", torch.as_tensor(whiten_display, dtype=torch.float32))
        self.unit_content = float(unit_content)
        self.unit_display = float(unit_display)

    @staticmethod
    def real_mask(x: torch.Tensor) -> torch.Tensor:
        """Letterbox padding is whole rows or columns of exact zeros; everything else is film."""
        rows = (x.amax(dim=3, keepdim=True) > 0).to(x.dtype)  # (N, 1, S, 1)
        cols = (x.amax(dim=2, keepdim=True) > 0).to(x.dtype)  # (N, 1, 1, S)
        return rows * cols

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Content features (view network, two depths) followed by the N_STATS display statistics."""
        z, parts = self.zscore(x)
        h = self.features[: self.mid](z)
        mid = h.mean(dim=(2, 3))
        last = self.features[self.mid :](h).mean(dim=(2, 3))
        return torch.cat([mid, last, self.display_stats(x, *parts)], dim=1)

    def zscore(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The view network's zscore input rebuilt from ``unit`` films (padding 0), and (mask, n, mean, std) for
        :meth:`display_stats`."""
        mask = self.real_mask(x)
        n = mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        mean = (x * mask).sum(dim=(2, 3), keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / n
        std = var.sqrt()
        return (x - mean) / std.clamp_min(1e-3) * mask, (mask, n, mean, std)

    @staticmethod
    def display_stats(
        x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """The N_STATS display statistics of ``unit`` films."""
        return torch.cat(
            [
                mean.flatten(1),
                # contrast is multiplicative: on a log scale a nearly blank film (spread ~0.01) is as far from
                # every hospital's films as it looks; on a linear scale the 224 px sources' spread swallowed it
                torch.log(std.flatten(1).clamp_min(1e-4)),
                ((x > 0.95).to(x.dtype) * mask).sum(dim=(2, 3)) / n.flatten(1),
                ((x < 0.05).to(x.dtype) * mask).sum(dim=(2, 3)) / n.flatten(1),
                1.0 - n.flatten(1) / float(x.shape[2] * x.shape[3]),
            ],
            dim=1,
        )

    def distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension Mahalanobis distances (content, display), not yet in calibration units."""
        return self.distances_of(self.embed(x))

    def distances_of(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`distances` from :meth:`embed`'s output (a build embeds each film once for every fit)."""
        v = (embedding - self.mean) / self.scale
        wc = v[:, :-N_STATS] @ self.whiten_content
        wd = v[:, -N_STATS:] @ self.whiten_display
        dc = (wc * wc).sum(dim=1, keepdim=True).div(float(self.whiten_content.shape[1])).sqrt()
        dd = (wd * wd).sum(dim=1, keepdim=True).div(float(N_STATS)).sqrt()
        return dc, dd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dc, dd = self.distances(x)
        return self.score_of(dc, dd)

    def score_of(self, dc: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
        return torch.maximum(dc / self.unit_content, dd / self.unit_display)


REBUILD_TOLERANCE = 1e-4  # a film whose rebuilt zscore input differs more than this from the gate's is run again


class ViewAndAtypical(nn.Module):
    """``view`` and ``atypical`` in one graph, computing the view network once per film where the two agree.

    Inputs: the gate's ``zscore`` film (view's own input) and its ``unit`` film (atypical's). Outputs: view's logits
    and atypical's score, each the detector's own function: view's network runs on the gate's z-score (view exact);
    atypical's features are those of the z-score it rebuilds from ``unit`` (padding = all-zero edge rows/columns),
    which is the gate's z-score except on films with all-black edge rows or columns inside the film (about 6% of
    val films): those films, and only those, get a second pass of the network on the rebuilt input, in the same
    batch (atypical exact). So the common film costs one network, not two.
    """

    def __init__(self, atypical: Atypicality, head: nn.Linear, tolerance: float = REBUILD_TOLERANCE) -> None:
        super().__init__()
        self.atypical = atypical
        self.head = head
        self.tolerance = float(tolerance)

    def forward(self, image: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.atypical
        rebuilt, parts = a.zscore(unit)
        differs = (rebuilt - image).abs().flatten(1).amax(dim=1) > self.tolerance  # (N,)
        again = torch.nonzero(differs).flatten()
        both = torch.cat([image, rebuilt.index_select(0, again)])  # N films, then the k that differ
        h = a.features[: a.mid](both)
        mid = h.mean(dim=(2, 3))
        last = a.features[a.mid :](h).mean(dim=(2, 3))
        n = image.shape[0]
        view = self.head(last[:n])
        # film i's atypical features: its own row, or row n + (its rank among the films run again)
        rows = torch.where(differs, torch.cumsum(differs.to(torch.int64), 0) - 1 + n, torch.arange(n))
        content = torch.cat([mid, last], dim=1).index_select(0, rows)
        dc, dd = a.distances_of(torch.cat([content, a.display_stats(unit, *parts)], dim=1))
        return view, a.score_of(dc, dd)


def fit_gaussian(emb: np.ndarray, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, per-dimension scale and whitening matrices W for the content and the display part (so that
    |(x - mean) / scale @ W|^2 is the Mahalanobis distance of that part)."""
    emb = np.asarray(emb, dtype=np.float64)
    mean = emb.mean(axis=0)
    scale = emb.std(axis=0)
    scale = np.where(scale < 1e-6, 1e-6, scale)
    v = (emb - mean) / scale
    return (
        mean.astype(np.float32),
        scale.astype(np.float32),
        _whitening(v[:, :-N_STATS], shrink),
        _whitening(v[:, -N_STATS:], shrink),
    )


def _whitening(v: np.ndarray, shrink: float) -> np.ndarray:
    cov = np.cov(v, rowvar=False)
    cov = (1.0 - shrink) * cov + shrink * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    return np.linalg.cholesky(precision).astype(np.float32)  # precision = W W^T
