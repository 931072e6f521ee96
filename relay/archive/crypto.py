"""age encryption (pyrage, X25519) of archive files: public keys in, identities out.

The relay is configured with recipients only (`archive.encrypt_to`), so a
stolen relay disk gives away no archived message. Reading needs an identity
file, the `age-keygen` format: `AGE-SECRET-KEY-1…` lines, `#` comments.
Encryption streams (pyrage.encrypt_io reads in chunks: a 50 MB message adds
under 1 MB of memory, measured); decryption reads one file whole, which the
commands do one message at a time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import pyrage

from relay.archive.store import ENCRYPTED, ArchiveError, ArchiveStore, Entry, Record, parse_record

Recipient = pyrage.x25519.Recipient
Identity = pyrage.x25519.Identity


def recipients(keys: Iterable[str]) -> list[Recipient]:
    return [Recipient.from_str(k) for k in keys]


def load_identities(paths: Iterable[Path]) -> list[Identity]:
    """Every secret key in the given identity files; ArchiveError when there is none."""
    found: list[Identity] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ArchiveError(f"{path}: {exc.strerror or exc}") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                found.append(Identity.from_str(line))
            except pyrage.IdentityError:
                raise ArchiveError(f"{path}:{n}: not an age identity") from None
    if not found:
        raise ArchiveError("no age identity in the --identity files")
    return found


def encrypt(src: BinaryIO, dst: BinaryIO, to: Sequence[Recipient]) -> None:
    pyrage.encrypt_io(src, dst, list(to))  # type: ignore[arg-type]  # any binary file will do


def decrypt(data: bytes, identities: Sequence[Identity]) -> bytes:
    if not identities:
        raise ArchiveError("encrypted, and no age identity given (--identity FILE)")
    try:
        return pyrage.decrypt(data, list(identities))
    except pyrage.DecryptError as exc:
        raise ArchiveError(f"cannot decrypt ({exc}): not encrypted to these identities?") from None


def load_record(store: ArchiveStore, entry: Entry, identities: Sequence[Identity]) -> Record:
    """One archived message, decrypted and checked against its index line."""
    path = store.path(entry)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"{entry.file}: {exc.strerror or exc}") from None
    record = parse_record(decrypt(data, identities) if path.suffix == ENCRYPTED else data)
    if hashlib.sha256(record.content).hexdigest() != entry.sha256:
        raise ArchiveError(f"{entry.file}: content does not match its index sha256")
    return record


class Joined(io.RawIOBase):
    """`head`, then `length` bytes of `body` from its position, as one readable stream,
    hashing the body part on the way (the index's sha256 of the content)."""

    def __init__(self, head: bytes, body: BinaryIO, length: int):
        self.head = memoryview(head)
        self.body = body
        self.left = length
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.body.read(min(len(buffer), self.left))
        if self.left and not data:
            raise ArchiveError(f"content truncated ({self.left} bytes missing)")
        self.left -= len(data)
        self.sha256.update(data)
        buffer[: len(data)] = data
        return len(data)
