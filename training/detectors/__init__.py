"""The detectors that need real labels or a trained backbone : flip, view, pediatric, atypical.

Each module registers its task in :mod:`filmgate_training.tasks` when imported; importing this
package registers them all.
"""

from filmgate_training.detectors import atypical_build, flip, pediatric, view  # noqa: F401  (registration side effect)
