"""Model hubs are off unless the operator turns them on: models load from package paths only."""

from __future__ import annotations

import os
import sys

_TRUE = {"1", "ON", "YES", "TRUE"}


def models_offline_by_default() -> None:
    """Set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE to 1 where the environment does not say otherwise, and make a
    huggingface_hub imported before this call (which read the variable at import) follow it. Called by the process
    entry points and before a model loads, never at import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE  # type: ignore[attr-defined]
