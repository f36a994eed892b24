"""Where PockEngine keeps what it fetches or builds once per machine."""

from __future__ import annotations

import os


def cache_dir():
    """`$POCKENGINE_CACHE`, else ~/.cache/pockengine: what targets fetch or build once per machine
    (the aarch64 sysroot, the stand-in CUDA driver), shared by every project on it."""
    from pathlib import Path

    configured = os.environ.get("POCKENGINE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pockengine"
