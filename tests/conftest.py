"""Session-wide test settings shared by every test area."""

from __future__ import annotations

import pytest

from filmgate_training.datasets import data_root


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop before the first test when the real films are not there: tests that read them without the ``data_dir``
    fixture (the shipped models' check films, say) would otherwise fail one by one as if a model had regressed."""
    root = data_root()
    if not (root / "labels.csv").is_file():
        pytest.exit(f"test data not found at {root} (no labels.csv): set FILMGATE_DATA to the shared data folder, or "
                    "put the checkout beside ../shared/data", returncode=pytest.ExitCode.USAGE_ERROR)  # fmt: skip


@pytest.fixture(scope="session")
def data_dir():
    """The real films (``FILMGATE_DATA``, default ../shared/data); ``pytest_sessionstart`` has made sure they are
    there (missing data is an error, not a skip)."""
    return data_root()
