"""hftk's own cache folder: tokenizers trained on a recipe's data, `hftk validate`'s remembered answers and
the measured peak FLOP/s of a device."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$HFTK_CACHE, or ~/.cache/hftk."""
    return Path(os.environ.get("HFTK_CACHE", Path.home() / ".cache" / "hftk"))
