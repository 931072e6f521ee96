"""Helpers for the archive and replay tests: age keys, config, the commands in a thread."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyrage
from click.testing import CliRunner, Result

from relay.cli import cli


def identity(folder: Path) -> tuple[Path, str]:
    """An age identity file (age-keygen format) and its public recipient."""
    key = pyrage.x25519.Identity.generate()
    path = folder / "archive-key.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# public key: {key.to_public()}\n{key}\n")
    return path, str(key.to_public())


def archive_yaml(recipient: str) -> str:
    return (
        f"archive: {{enabled: true, dir: ../var/archive, encrypt_to: [{recipient}]}}\n"
        "retry: {schedule: [0.2], max_age: 1}\n"
    )


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


async def run_async(*args: str) -> Result:
    """The command in a thread: the relay under test runs on this loop and answers it."""
    return await asyncio.to_thread(run, *args)


def message(n: int) -> bytes:
    return (
        f"From: s@example.org\r\nSubject: pilot-subject-{n}\r\nMessage-ID: <m{n}@t>\r\n\r\n"
        f"body-marker-{n}\r\n"
    ).encode()
