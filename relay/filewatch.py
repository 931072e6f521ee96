"""Reloading a file when it is edited: the pilot list and the recipients file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import watchfiles


async def watch(path: Path, reload: Callable[[], object]) -> None:
    """Call `reload` after each change of `path` (its folder is watched: editors
    replace a file rather than write it in place)."""
    async for changes in watchfiles.awatch(path.parent, debounce=200, step=50, rust_timeout=1000):
        if any(Path(p).name == path.name for _, p in changes):
            reload()
