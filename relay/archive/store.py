"""The archive directory: one file per message, a plain index, keyed recipient hashes.

    <dir>/YYYY-MM-DD/<queue id>.age   the archived record, age-encrypted (.eml: plaintext)
    <dir>/index.jsonl                 one JSON line per archived message (Entry), no key needed
    <dir>/index.key                   the secret of the recipient hashes (HMAC-SHA-256)
    <dir>/index.lock                  flock: appends and rewrites of the index, one at a time

A record is one JSON header line (`{"v", "node", "envelope"}`) followed by the
message content exactly as the providers were sent it. The index holds no
subject and no clear local part: recipients are keyed hashes of the mailbox
(local part without its `+tag`, lowercased, at the ASCII domain), so the
entries of one user are found by hashing that user's address with the key
kept next to the index. Whoever can read index.key can test guessed addresses
against the index; nobody without an age identity can read a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import ascii_domain
from relay.records import Envelope, RecordError, fields, parse_envelope
from relay.spool.store import fsync_dir

RECORD_VERSION = 1
INDEX = "index.jsonl"
KEY = "index.key"
LOCK = "index.lock"
ENCRYPTED, PLAIN = ".age", ".eml"


class ArchiveError(Exception):
    """The archive cannot do what was asked (a missing file, a record that does not parse)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One archived message in the index: what `relay archive list` shows without a key."""

    queue_id: str
    node: str
    received: str  # RFC 3339 UTC, the message's `received` time
    epoch: float
    groups: tuple[str, ...]  # the pilot groups of its recipients at acceptance
    rcpts: tuple[str, ...]  # keyed hashes of the recipients' mailboxes
    size: int  # content bytes
    sha256: str  # of the content: an exported EML can be checked against it
    file: str  # relative to the archive directory
    keys: tuple[str, ...]  # the age recipients it is encrypted to; () = plaintext

    def to_line(self) -> bytes:
        record = {
            "queue_id": self.queue_id, "node": self.node, "received": self.received,
            "epoch": self.epoch, "groups": list(self.groups), "rcpts": list(self.rcpts),
            "size": self.size, "sha256": self.sha256, "file": self.file, "keys": list(self.keys),
        }  # fmt: skip
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def parse_entry(raw: bytes | str) -> Entry:
    f = fields(raw, "index entry")
    file = f.text("file")
    if file.startswith("/") or ".." in file.split("/"):
        raise RecordError(f"index entry: file {file!r} is outside the archive")
    return Entry(
        f.text("queue_id"), f.text("node"), f.text("received"), f.number("epoch") or 0.0,
        f.texts("groups"), f.texts("rcpts"), f.count("size") or 0, f.text("sha256"),
        file, f.texts("keys"),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Record:
    """A decrypted archive file: the envelope and the exact content sent to the providers."""

    node: str
    envelope: Envelope
    content: bytes


def record_header(node: str, envelope: Envelope) -> bytes:
    """The first line of an archive file (JSON escapes newlines: it is one line)."""
    return (
        b'{"v":%d,"node":%s,"envelope":' % (RECORD_VERSION, json.dumps(node).encode())
        + envelope.to_json()
        + b"}\n"
    )


def parse_record(data: bytes) -> Record:
    head, sep, content = data.partition(b"\n")
    if not sep:
        raise ArchiveError("archive record without a header line")
    try:
        obj: Any = json.loads(head)
        if not isinstance(obj, dict) or obj.get("v") != RECORD_VERSION:
            raise ArchiveError("archive record of an unknown version")
        f = fields(obj, "archive record")
        return Record(f.text("node"), parse_envelope(f.value("envelope", (dict,))), content)
    except (ValueError, RecordError) as exc:
        raise ArchiveError(f"archive record header: {exc}") from None


def mailbox(address: str, delimiter: str) -> str:
    """The user an address belongs to: local part without its tag, lowercased, ASCII domain."""
    local, _, domain = address.rpartition("@")
    if delimiter and delimiter in local and not local.startswith(delimiter):
        local = local.partition(delimiter)[0]
    return f"{local.lower()}@{ascii_domain(domain)}" if domain else address.lower()


class ArchiveStore:
    """The files of one archive directory, shared by the relay's workers and the commands."""

    def __init__(self, root: Path, delimiter: str = "+"):
        self.root = root
        self.delimiter = delimiter
        self.index = root / INDEX
        self._key: bytes | None = None

    def create(self) -> None:
        """Make the directory; remove records a crash left half written (never indexed).

        A record being written is `<id>.<pid>.tmp`: only those of processes gone
        are removed, so a worker starting never takes another's file away."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for tmp in self.root.glob("*/*.tmp"):
            if not _alive(tmp.suffixes[-2].lstrip(".") if len(tmp.suffixes) > 1 else ""):
                tmp.unlink(missing_ok=True)

    def tmp_path(self, folder: Path, queue_id: str) -> Path:
        return folder / f"{queue_id}.{os.getpid()}.tmp"

    # -- recipient hashes

    def key(self) -> bytes:
        """The secret of the recipient hashes, created (0600, durable) on first use."""
        if self._key is None:
            path = self.root / KEY
            try:
                self._key = bytes.fromhex(path.read_text().strip())
            except FileNotFoundError:
                self._key = self._new_key(path)
        return self._key

    def _new_key(self, path: Path) -> bytes:
        key = secrets.token_bytes(32)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:  # link, not rename: a key another process made first is kept
            os.link(tmp, path)
        except FileExistsError:
            key = bytes.fromhex(path.read_text().strip())
        finally:
            tmp.unlink()
        fsync_dir(self.root)
        return key

    def user_hash(self, address: str) -> str:
        digest = hmac.new(self.key(), mailbox(address, self.delimiter).encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    # -- files

    def path(self, entry: Entry) -> Path:
        return self.root / entry.file

    def day_dir(self, day: str) -> Path:
        """`YYYY-MM-DD/` under the archive, created durably when new."""
        path = self.root / day
        if not path.is_dir():
            path.mkdir(exist_ok=True, mode=0o700)
            fsync_dir(self.root)
        return path

    # -- the index

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, *entries: Entry) -> None:
        """Add entries durably, in one write. A line torn by a crash is ended first, so
        ours stay whole."""
        with self.locked():
            fd = os.open(self.index, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                os.write(fd, b"".join([b"\n" if torn else b"", *(e.to_line() for e in entries)]))
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[Entry]:
        """Every indexed message, oldest first; a message archived twice (a crash
        between its index line and its delivery state) counts once, the last line."""
        try:
            raw = self.index.read_bytes()
        except FileNotFoundError:
            return []
        found: dict[str, Entry] = {}
        for line in raw.splitlines():
            with contextlib.suppress(RecordError):
                entry = parse_entry(line)
                found.pop(entry.queue_id, None)
                found[entry.queue_id] = entry
        return sorted(found.values(), key=lambda e: (e.epoch, e.queue_id))

    def select(
        self, since: float | None = None, until: float | None = None, users: Sequence[str] = ()
    ) -> list[Entry]:
        """Entries received in [since, until) with any of `users` among their recipients."""
        wanted = {self.user_hash(u) for u in users}
        return [
            e
            for e in self.entries()
            if (since is None or e.epoch >= since)
            and (until is None or e.epoch < until)
            and (not wanted or wanted.intersection(e.rcpts))
        ]

    def remove(self, doomed: Callable[[Entry], bool]) -> list[Entry]:
        """Delete the messages `doomed` picks: their files first (durably), then their
        index lines (the index is rewritten and renamed into place). A crash between
        the two leaves index lines without files, which every reader skips."""
        with self.locked():
            entries = self.entries()
            removed = [e for e in entries if doomed(e)]
            if not removed:
                return []
            dirs = set()
            for e in removed:
                self.path(e).unlink(missing_ok=True)
                dirs.add(self.path(e).parent)
            for d in dirs:
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(d)
                    if not any(d.iterdir()):
                        d.rmdir()
            gone = {e.queue_id for e in removed}
            tmp = self.index.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.writelines(e.to_line() for e in entries if e.queue_id not in gone)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self.index)
            fsync_dir(self.root)
        return removed


def _alive(pid: str) -> bool:
    """Whether a process of that id exists (not ours to signal is alive too)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
