"""The gate's judge as the training reports use it: the shipped detectors, the default policy, on the CPU.

The gate report and the non-radiograph report both judge films exactly as the node does; they share this one
constructor (a module of its own, so that neither report imports the other).
"""

from __future__ import annotations

from pathlib import Path

from filmgate.config import parse_config
from filmgate.judge import Judge


def gate_judge(models: Path) -> Judge:
    """The gate's judge over the detectors under ``models``, default policy, CPU, one thread per model."""
    detectors = {"models_dir": str(models), "provider": "cpu", "intra_op_threads": 1}
    return Judge.load(parse_config({"detectors": detectors}))
