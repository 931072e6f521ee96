"""Helpers for tests that run `python -m relay serve` as a real subprocess.

Used by test_crash.py (SIGKILL at random instants) and test_shutdown.py
(SIGTERM under load). Providers run in the test's own event loop
(`relay.testing.Provider`); clients are asyncio aiosmtplib sessions that each
send a stream of uniquely numbered messages and note which ones got a 250.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from relay.testing import Provider
from tests.harness import relay_settings, write_relay

ROOT = Path(__file__).resolve().parent.parent
SEQ_HEADER = b"X-Test-Seq: "

# recipients of a message → where each copy must arrive: {(provider, delivered_to)}
ROUTES: list[tuple[list[str], set[tuple[str, str]]]] = [
    (["alice@example.com"], {("legacy", "alice@example.com"), ("new", "alice@example-new.com")}),
    (["zed@example.com"], {("legacy", "zed@example.com")}),
    (["bob@example.com"], {("new", "robert@example-new.com")}),
    (
        ["alice@example.com", "zed@example.com", "ann@dev.example.com"],
        {
            ("legacy", "alice@example.com"), ("legacy", "zed@example.com"),
            ("legacy", "ann@dev.example.com"), ("new", "alice@example-new.com"),
            ("new", "ann@dev.example-new.com"),
        },
    ),
]  # fmt: skip


# relays run as subprocesses: short retries and timeouts, many clients from one IP
PROCESS_PROFILE = {
    "node": "crash",
    "retry": {"schedule": [0.1, 0.2], "max_age": 3600},
    "limits": {"max_connections_per_ip": 100},
}
PROCESS_PROVIDER = {"connect_timeout": 2, "command_timeout": 5, "data_timeout": 5,
                    "max_connections": 4}  # fmt: skip


def write_relay_config(
    folder: Path,
    port: int,
    legacy: Provider,
    new: Provider,
    provider_keys: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> Path:
    """`provider_keys`: extra `providers.<name>` keys, e.g. {"legacy": {"username": ...}}."""
    settings = relay_settings(
        legacy.port, new.port, PROCESS_PROFILE, {"listen": {"port": port}},
        {"providers": provider_keys or {}}, overrides, provider=PROCESS_PROVIDER,
    )  # fmt: skip
    return write_relay(folder / "config", settings)


class RelayProcess:
    """`python -m relay serve -c CONFIG`, restartable on the same port."""

    def __init__(self, config_path: Path, port: int, stderr_path: Path, group: bool = False):
        """`group`: own process group, signalled as a whole by kill() (a supervisor + workers)."""
        self.config_path = config_path
        self.group = group
        self.port = port
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=self.group,
            )  # fmt: skip

    async def wait_ready(self, timeout: float = 15) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.tail()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError(f"relay not listening: {self.tail()}") from None
                await asyncio.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL and reap (blocks the loop for the few ms the kernel needs)."""
        assert self.proc is not None
        if self.group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after `timeout`, seconds taken)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self.proc.poll(), time.monotonic() - t0

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.stderr_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


@dataclass
class Load:
    """Several client sessions sending numbered messages until told to stop."""

    port: int
    clients: int = 6
    per_session: int = 5
    size: int = 2048
    limit: int | None = None  # messages in all (None: until stopped)
    accepted: dict[int, set[tuple[str, str]]] = field(default_factory=dict)
    attempted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _seq: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(4))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    def _message(self, seq: int, rcpts: list[str]) -> bytes:
        head = (
            (
                f"From: load@example.org\r\nTo: {', '.join(rcpts)}\r\n"
                f"Subject: load {seq}\r\nMessage-ID: <seq{seq}@load.test>\r\n"
            ).encode()
            + SEQ_HEADER
            + str(seq).encode()
            + b"\r\n\r\n"
        )
        line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n"
        return head + line * max(1, self.size // len(line))

    async def _client(self, n: int) -> None:
        while not self.stop.is_set():
            try:
                smtp = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=self.port, start_tls=False, timeout=5,
                    local_hostname=f"client{n}.test",
                )  # fmt: skip
                await smtp.connect()
                try:
                    for _ in range(self.per_session):
                        if self.stop.is_set() or (self.limit and self._seq >= self.limit):
                            break
                        self._seq += 1
                        seq = self._seq
                        rcpts, where = self.rng.choice(ROUTES)
                        self.attempted += 1
                        errors, _ = await smtp.sendmail(
                            "load@example.org", rcpts, self._message(seq, rcpts)
                        )
                        assert not errors, errors
                        self.accepted[seq] = set(where)  # got the 250
                finally:
                    smtp.close()
                if self.limit and self._seq >= self.limit:
                    return
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.02)  # the relay is down or restarting


def seq_of(data: bytes) -> int | None:
    i = data.find(b"\r\n" + SEQ_HEADER)
    if i < 0:
        return None
    j = data.index(b"\r\n", i + 2)
    return int(data[i + 2 + len(SEQ_HEADER) : j])


@dataclass
class Tally:
    lost: list[tuple[int, str, str]]
    duplicates: int  # extra transactions carrying a (message, provider) already received
    copies: int  # deliveries expected (accepted messages × destinations)
    extra_seqs: int  # messages at a provider that never got a 250 (allowed)
    max_copies: int = 0  # most transactions carrying one (message, provider)


def tally(accepted: dict[int, set[tuple[str, str]]], providers: dict[str, Provider]) -> Tally:
    got: dict[tuple[int, str], list[list[str]]] = {}
    for name, p in providers.items():
        for m in p.messages:
            seq = seq_of(m.data)
            if seq is not None:
                got.setdefault((seq, name), []).append(m.rcpts)
    lost = []
    for seq, where in accepted.items():
        for provider, rcpt in where:
            if not any(rcpt in rcpts for rcpts in got.get((seq, provider), [])):
                lost.append((seq, provider, rcpt))
    duplicates = sum(len(v) - 1 for v in got.values())
    extra = len({seq for seq, _ in got} - set(accepted))
    most = max((len(v) for v in got.values()), default=0)
    return Tally(lost, duplicates, sum(len(w) for w in accepted.values()), extra, most)


def logged_remote_ids(log_path: Path) -> set[str]:
    """Provider ids of every delivery the relay recorded (state on disk, then logged)."""
    ids = set()
    with contextlib.suppress(FileNotFoundError), open(log_path, "rb") as fh:
        for line in fh:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line torn by SIGKILL
            if e.get("event") == "delivery" and e.get("remote_id"):
                ids.add(e["remote_id"])
    return ids


def open_transactions(p: Provider) -> int:
    """Provider sessions between MAIL and the reply to the final "." right now."""
    return sum(
        1
        for proto in list(p._protocols)
        if proto.envelope is not None and proto.envelope.mail_from is not None
    )


def queue_files(spool: Path) -> list[str]:
    q = spool / "queue"
    return sorted(os.listdir(q)) if q.exists() else []
