"""``flip``: is the frontal chest film a mirror image (left and right swapped)?

Self-supervised: every frontal chest film of the train split, adult and child, shown as it came (``normal``) or
mirrored left-right (``flipped``). What tells them apart is anatomy (heart and aortic knob on the patient's left,
gastric bubble under the left diaphragm, liver on the right) and burned-in markers, whose glyphs mirror with the film
(the framework burns film markers *before* the transform and viewer overlays *after* it, so readable text is no clue
by itself). Mirrored films are the commonest error in the literature and the one that falls most across hospitals,
so evaluation is per source.

``model.mirror_swap`` exports the network mirror-consistent (it scores the film and its mirror image, so the two
always get complementary scores) at twice the cost.
"""

from __future__ import annotations

import numpy as np

from filmgate_training.tasks import SyntheticTask, register


def _identity(img: np.ndarray) -> np.ndarray:
    return img


def _mirror(img: np.ndarray) -> np.ndarray:
    return img[:, ::-1]


TASK = register(
    SyntheticTask(
        name="flip",
        labels=("normal", "flipped"),
        positive_labels=("flipped",),
        reason="flipped",
        description=(
            "Is the frontal chest film mirrored left-right (patient's left shown on the viewer's left)? "
            "flipped = numpy.fliplr of the film as it should be displayed."
        ),
        film_kinds=("frontal-chest",),
        transforms=(_identity, _mirror),
        mirror_pair=True,
    )
)
