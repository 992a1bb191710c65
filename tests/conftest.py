import os
from pathlib import Path

import pytest
import torch

# Tiny test models run fastest on one intra-op thread (and CI machines have only 2 cores).
torch.set_num_threads(1)


def reference_dir() -> Path:
    """Numeric references from upstream Open-Sora (not shipped to users): skip tests when absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "reference"
    return Path(os.environ.get("DUCA_REFERENCE_DIR", default))


@pytest.fixture
def reference() -> Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.skip(f"reference folder {path} not present")
    return path
