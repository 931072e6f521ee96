"""How `relay serve` reports a failed start, and its pid file (for both kinds of process).

Every startup step that can fail for a reason outside the program (a port in
use, a spool without permission) runs inside `starting(WHAT)`, so the operator
reads one line `relay: WHAT: WHY` rather than a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class StartupError(Exception):
    """Why `relay serve` cannot start: shown to the operator as `relay: WHAT: WHY`."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


@contextlib.contextmanager
def starting(what: str) -> Iterator[None]:
    """Turn an OS error of one startup step into a StartupError naming the step."""
    try:
        yield
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(what, why) from None


class PidFile:
    """`pid_file`: written once the listener is up (for logrotate and init scripts)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __bool__(self) -> bool:
        return self.path is not None

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with starting(f"pid_file {self.path}"):
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
