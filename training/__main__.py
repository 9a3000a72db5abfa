"""``python -m filmgate_training``: see :mod:`filmgate_training.cli`."""

from filmgate_training.cli import main

raise SystemExit(main())
