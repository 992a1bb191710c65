from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import reference_dir

# Tiny test models run fastest on one intra-op thread (and CI machines have only 2 cores).
torch.set_num_threads(1)


@pytest.fixture
def reference() -> Path:
    path = reference_dir()
    if path is None or not path.is_dir():
        pytest.skip(f"$DUCA_REFERENCE_DIR is not set to a folder of reference files (got {path})")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it (CLI runs may change it): on a shared 2-core CI
    machine OpenMP threads spinning against each other make the tiny model ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for the test (its inputs are drawn with it), restored after: for comparisons
    of whole sampling loops, where this tiny random model amplifies float32 rounding by CPU kernel."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A multi-process test is also slow: `-m "not slow"` (the fast tier) leaves both out."""
    for item in items:
        if item.get_closest_marker("multiprocess") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
