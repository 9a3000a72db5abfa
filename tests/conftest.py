"""Session-wide test settings shared by every test area."""

from __future__ import annotations

import pytest

from filmgate_training.datasets import data_root


@pytest.fixture(scope="session")
def data_dir():
    """The real films (``FILMGATE_DATA``, default ../shared/data). Missing data is an error, not a skip."""
    root = data_root()
    assert (root / "labels.csv").is_file(), f"test data not found at {root}; set FILMGATE_DATA"
    return root
