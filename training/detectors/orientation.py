"""``orientation``: is the frontal chest film displayed upright? Self-supervised (the film turned 0/90/180/270).

Inverted films are shown to a share of training films of every class (nuisance), so an inverted film does not raise
``rotated``.
"""

from __future__ import annotations

from filmgate_training.detectors.faults import identity, invert, rot
from filmgate_training.tasks import SyntheticTask, register

TASK = register(
    SyntheticTask(
        name="orientation",
        labels=("upright", "rot90", "rot180", "rot270"),
        positive_labels=("rot90", "rot180", "rot270"),
        reason="rotated",
        description=(
            "Is the frontal chest film displayed upright? rotN = the upright film turned N degrees counter-clockwise "
            "(numpy.rot90(k=N/90)); turn it back N degrees clockwise to correct it."
        ),
        transforms=(identity, rot(1), rot(2), rot(3)),
        nuisance=(invert,),
        nuisance_p=0.15,
    )
)
