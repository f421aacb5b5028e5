"""The models that ship inside the package: lanner-tiny (the default when no
model is named) and lanner-tiny-draft, both trained by scripts/train_tiny.py on
the Python standard library (docs/lanner-tiny.md)."""
from __future__ import annotations

import os

from lanner.errors import ConfigError

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "lanner-tiny")
DRAFT_MODEL = os.path.join(ASSETS, "lanner-tiny-draft")
# the speculative proposers trained for lanner-tiny, by method (scripts/train_tiny.py)
SHIPPED_PROPOSERS = {"draft_model": DRAFT_MODEL, "eagle3": os.path.join(ASSETS, "lanner-tiny-eagle3"),
                     "mtp": os.path.join(ASSETS, "lanner-tiny-mtp")}


def default_model_path() -> str:
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        raise ConfigError(f"the embedded model is missing from {DEFAULT_MODEL}; reinstall lanner or pass --model")
    return DEFAULT_MODEL
