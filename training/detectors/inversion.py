"""``inversion``: is the film displayed with inverted grey levels? Self-supervised (the film as it came or 1 - film).

Rotated films are shown to a share of training films of every class (nuisance), so a rotated film does not raise
``inverted``.
"""

from __future__ import annotations

from filmgate_training.detectors.faults import identity, invert, rot
from filmgate_training.tasks import SyntheticTask, register

TASK = register(
    SyntheticTask(
        name="inversion",
        labels=("normal", "inverted"),
        positive_labels=("inverted",),
        reason="inverted",
        description=(
            "Is the film displayed with inverted grey levels (bone and mediastinum dark, lungs bright), e.g. a "
            "MONOCHROME1/MONOCHROME2 header that does not match the pixels?"
        ),
        transforms=(identity, invert),
        nuisance=(rot(1), rot(2), rot(3)),
        nuisance_p=0.3,
    )
)
