"""Makes the stand-ins in tests/upstream_stubs visible to a test's subprocess, after every installed package.

A test that runs upstream's own scripts puts this folder on PYTHONPATH; Python imports `sitecustomize` at start-up.
transformers decides once, on import, which optional packages exist (torchvision, timm, peft, ...) and then
imports them for its own use; it is imported here first, so it sees the real environment, not the stand-ins
(the in-process tests do the same, see tests/upstream.py). Then the stand-ins folder is appended to sys.path, so
an installed package of the same name always wins.
"""

import sys
from pathlib import Path

import transformers.modeling_utils  # noqa: F401 - its optional-package probes run before any stand-in exists

sys.path.append(str(Path(__file__).resolve().parent.parent))
