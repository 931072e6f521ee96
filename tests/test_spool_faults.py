"""The spool's disk fills while a message is committed (SPEC Part 2 "Faults").

A message under the 1 MiB write threshold stays in memory until the commit;
when that write hits ENOSPC the partial `.tmp` (all the space that was left)
must go at once, or the relay answers 452 to everything until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import tmpfs
from tests.helpers_ingress import RelayFactory, relay_factory  # noqa: F401

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def spool_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "relay" / "var", "2m") as mnt:
        yield mnt


def send(port: int, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("sender@origin.test")
        s.rcpt("zed@example.com")
        return s.data(body)


@pytest.mark.parametrize("lines", [800, 1200], ids=["at-commit", "mid-data"])
async def test_enospc_leaves_no_partial_file(
    relay_factory: RelayFactory,  # noqa: F811
    spool_fs: Path,
    lines: int,
) -> None:
    """800 KB: held in memory, written at the commit; 1.2 MB: a threaded write mid-DATA."""
    env = await relay_factory(limits="min_free_space: 1000\n")
    (spool_fs / "filler").write_bytes(b"\0" * (1536 * 1024))  # about 500 KiB left
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * lines
    code, text = await asyncio.to_thread(send, env.port, big)
    assert (code, text[:5]) == (452, b"4.3.1")
    assert list(env.spool_queue.iterdir()) == []  # no .tmp holding the space
    code, _ = await asyncio.to_thread(send, env.port, b"Subject: small\r\n\r\nhi\r\n")
    assert code == 250


def test_discard_removes_the_file_even_when_closing_fails(spool_fs: Path) -> None:
    """A `.tmp` on a full disk still goes (closing cannot fail it)."""
    from relay.spool import Incoming

    path = spool_fs / "Q.tmp"
    msg = Incoming("Q", path)
    msg._flush([b"x" * 100])  # opens the file
    with open(spool_fs / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while fh.write(b"\0" * 4096):
            pass
    assert os.statvfs(spool_fs).f_bavail == 0
    msg.discard()
    assert not path.exists()
