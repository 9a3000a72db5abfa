"""Fixtures of the detectors tests (their helpers are in tests/helpers.py, the one module tests import helpers from)."""

from __future__ import annotations

import pytest

from tests.helpers import MODELS, ShippedDetector


@pytest.fixture(scope="session")
def detector():
    """``detector(name)``: the shipped model of that name, judged by the gate's judge; a missing model is a failure,
    not a skip."""
    cache: dict[str, ShippedDetector] = {}

    def get(name: str) -> ShippedDetector:
        if name not in cache:
            cache[name] = ShippedDetector(name, MODELS)
        return cache[name]

    return get
