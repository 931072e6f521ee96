"""IMAP IDLE in one provider's canary mailbox, so a canary is looked for when it lands.

IDLE (RFC 2177) tells of new mail in the selected folder only, so each folder a
canary can land in (the Inbox and the junk folders, at most `MAX_FOLDERS`) has
its own read-only session (EXAMINE, then IDLE), each in its own thread of a
pool of `MAX_FOLDERS` (IMAPClient is synchronous; the event loop never waits
on it). IDLE is re-issued every `canary.idle_renew` seconds, well inside the 29
minutes after which servers end it; a failed session is counted
(`relay_probe_errors_total`), logged and opened again after a back-off of 1 to
60 s. Each new message, and each (re)connection, calls `arrived` on the event
loop: the daemon then looks at once for the canaries it awaits at that
provider. Without IDLE on the server (or with `canary.idle: false`) nothing runs
here and the daemon's short polls (`canary.poll`) are all there is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from relay.log import oplog
from relay.probe.errors import ProbeError
from relay.probe.imap import ImapSession

MAX_FOLDERS = 4  # Inbox and up to three junk folders: the sessions (threads) per provider
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds before the n-th reconnection

# runs `work` in a new session in `login`, counting its commands (ProviderProbe._session)
Opener = Callable[[str, Callable[[ImapSession], Any]], Any]


class CanaryWatch:
    """The IDLE sessions in one provider's canary mailbox; `failed` runs on the event loop."""

    def __init__(
        self, provider: str, login: str, open_session: Opener, renew: float,
        failed: Callable[[ProbeError], None],
    ):  # fmt: skip
        self.provider, self.login, self.renew = provider, login, renew
        self.open_session = open_session
        self.failed = failed
        self.stop = threading.Event()
        self.executor = ThreadPoolExecutor(MAX_FOLDERS, thread_name_prefix=f"idle-{provider}")
        self._lock = threading.Lock()
        self._live = 0  # sessions in IDLE now
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def watching(self) -> bool:
        """At least one folder is watched: a canary is seen when it lands there."""
        return self._live > 0

    async def run(self, arrived: Callable[[], None]) -> None:
        """Until `stop`: find the folders, then watch each in its own thread."""
        loop = self._loop = asyncio.get_running_loop()

        def came() -> None:
            loop.call_soon_threadsafe(arrived)

        folders = await loop.run_in_executor(self.executor, self._folders)
        if not folders:
            if not self.stop.is_set():
                oplog.info("canary IDLE not offered", provider=self.provider)
            return
        oplog.info("canary IDLE", provider=self.provider, folders=list(folders))
        await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._keep, f, came) for f in folders)
        )

    def close(self) -> None:
        self.stop.set()
        self.executor.shutdown(wait=True)

    def _folders(self) -> tuple[str, ...]:
        """In a thread: the watched folders, retried until a session works or `stop`."""
        return self._retrying(lambda: self.open_session(self.login, _idle_folders)) or ()

    def _keep(self, folder: str, came: Callable[[], None]) -> None:
        """In a thread: one folder watched until `stop`, reconnecting after errors."""
        self._retrying(
            lambda: self.open_session(self.login, lambda s: self._watch(s, folder, came))
        )

    def _retrying(self, work: Callable[[], Any]) -> Any:
        failures = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                return work()
            except ProbeError as exc:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.failed, exc)
                if time.monotonic() - started > BACKOFF[-1]:
                    failures = 0  # it had worked a while: start the back-off again
                self.stop.wait(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
        return None

    def _watch(self, session: ImapSession, folder: str, came: Callable[[], None]) -> None:
        with self._lock:
            self._live += 1
        try:
            session.watch(folder, self.stop, came, self.renew)
        finally:
            with self._lock:
                self._live -= 1


def _idle_folders(session: ImapSession) -> tuple[str, ...]:
    return session.idle_folders(MAX_FOLDERS)
