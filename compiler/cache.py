"""Where EdgeMoE keeps what it measured between runs (expert sensitivities, tuning records)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$EDGEMOE_CACHE_DIR, else ~/.cache/edgemoe."""
    return Path(os.environ.get("EDGEMOE_CACHE_DIR", Path.home() / ".cache" / "edgemoe"))
