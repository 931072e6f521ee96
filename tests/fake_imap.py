"""An in-memory stand-in for IMAPClient, for the probe's fast tests.

It behaves like a strict server for what the probe may do (EXAMINE, UID SEARCH
HEADER / SINCE / X-GM-RAW, UID FETCH of header fields and INTERNALDATE) and
fails the test for anything else: a fetch of a body or of a flag-setting item,
and a read-write SELECT, a flag or an expunge anywhere but in the logins of
`writable` (the canary mailboxes). Messages keep their UID for life. Every call
is recorded in `commands`, every write also in `writes` (login, command), so a
test can assert none went elsewhere even when the probe swallowed the failure.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.parser import BytesHeaderParser
from typing import Any

from imapclient.exceptions import LoginError


@dataclass
class FakeMessage:
    headers: bytes  # the header section, CRLF lines
    internaldate: datetime
    uid: int = 0
    flags: set[bytes] = field(default_factory=set)

    def header(self, name: str) -> list[str]:
        msg = BytesHeaderParser().parsebytes(self.headers)
        return [str(v) for v in msg.get_all(name) or []]


@dataclass
class FakeServer:
    """Mailboxes by login: folder name -> (flags, messages)."""

    capabilities: tuple[bytes, ...] = (b"IMAP4REV1", b"SPECIAL-USE")
    password: str = "pw"
    token: str | None = None  # accepted XOAUTH2 token
    down: bool = False  # connections refused
    mailboxes: dict[str, dict[str, tuple[tuple[bytes, ...], list[FakeMessage]]]] = field(
        default_factory=dict
    )
    commands: list[tuple[str, Any]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    writable: set[str] = field(default_factory=set)  # logins the probe may delete in
    writes: list[tuple[str, str]] = field(default_factory=list)
    uidvalidity: int = 7
    next_uid: int = 1
    lock: threading.RLock = field(default_factory=threading.RLock)

    def mailbox(self, login: str, junk: str = "Junk", junk_flag: bool = True) -> dict[str, Any]:
        if login not in self.mailboxes:
            flags = (b"\\HasNoChildren", b"\\Junk") if junk_flag else (b"\\HasNoChildren",)
            self.mailboxes[login] = {
                "INBOX": ((b"\\HasNoChildren",), []),
                junk: (flags, []),
                "Sent": ((b"\\HasNoChildren", b"\\Sent"), []),
            }
        return self.mailboxes[login]

    def file(self, login: str, folder: str, headers: str, when: datetime | None = None) -> None:
        """Put a message in a folder (as the provider's filter would)."""
        raw = headers.replace("\n", "\r\n").encode() + b"\r\n"
        with self.lock:
            box = self.mailbox(login)
            if folder not in box:
                box[folder] = ((b"\\HasNoChildren",), [])
            box[folder][1].append(FakeMessage(raw, when or datetime.now(UTC), self.next_uid))
            self.next_uid += 1

    def uids(self, login: str, folder: str) -> list[int]:
        with self.lock:
            return [m.uid for m in self.mailbox(login)[folder][1]]

    def client(self, host: str, **kwargs: Any) -> FakeClient:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return FakeClient(self)

    def count(self, name: str) -> int:
        return sum(1 for c, _ in self.commands if c == name)


class FakeClient:
    def __init__(self, server: FakeServer):
        self.server = server
        self.login_name: str | None = None
        self.selected: str | None = None
        self.readonly = True
        self.normalise_times = True

    def _note(self, name: str, arg: Any = None) -> None:
        with self.server.lock:
            self.server.commands.append((name, arg))

    def capabilities(self) -> tuple[bytes, ...]:
        return self.server.capabilities

    def login(self, user: str, password: str) -> None:
        self._note("LOGIN", user)
        if password != self.server.password:
            raise LoginError("[AUTHENTICATIONFAILED] Authentication failed.")
        self.login_name = user
        self.server.logins.append(user)

    def oauth2_login(self, user: str, token: str) -> None:
        self._note("AUTHENTICATE", user)
        if token != self.server.token:
            raise LoginError("[AUTHENTICATIONFAILED] Authentication failed.")
        self.login_name = user
        self.server.logins.append(user)

    def starttls(self, ctx: Any) -> None:
        self._note("STARTTLS")

    def _box(self) -> dict[str, Any]:
        assert self.login_name is not None
        with self.server.lock:
            return self.server.mailbox(self.login_name)

    def list_folders(self) -> list[tuple[tuple[bytes, ...], bytes, str]]:
        self._note("LIST")
        return [(flags, b"/", name) for name, (flags, _) in self._box().items()]

    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        self.selected = None
        if not readonly:
            self._write("SELECT")
        self._note("EXAMINE" if readonly else "SELECT", folder)
        self.selected = folder
        self.readonly = readonly
        answer: dict[bytes, Any] = {b"UIDVALIDITY": self.server.uidvalidity}
        return {b"READ-ONLY": [b""], **answer} if readonly else answer

    def _write(self, command: str) -> None:
        """Record a write; fail unless this is a canary mailbox (a read-write selection)."""
        with self.server.lock:
            self.server.writes.append((str(self.login_name), command))
        assert self.login_name in self.server.writable, f"{command} in {self.login_name}"
        assert command == "SELECT" or not self.readonly, f"{command} in an EXAMINEd folder"

    def add_flags(self, uids: list[int], flags: list[bytes], silent: bool = False) -> None:
        self._write("STORE")
        self._note("STORE", (list(uids), list(flags)))
        for m in self._messages():
            if m.uid in uids:
                m.flags.update(flags)

    def _expunge(self, only: list[int] | None) -> None:
        with self.server.lock:
            assert self.selected is not None
            msgs = self._box()[self.selected][1]
            msgs[:] = [
                m
                for m in msgs
                if b"\\Deleted" not in m.flags or (only is not None and m.uid not in only)
            ]

    def uid_expunge(self, uids: list[int]) -> None:
        self._write("UID EXPUNGE")
        self._note("UID EXPUNGE", list(uids))
        assert b"UIDPLUS" in self.server.capabilities
        self._expunge(list(uids))

    def expunge(self) -> None:
        self._write("EXPUNGE")
        self._note("EXPUNGE")
        self._expunge(None)

    def _messages(self) -> list[FakeMessage]:
        assert self.selected is not None
        with self.server.lock:
            return list(self._box()[self.selected][1])

    def search(self, criteria: list[Any]) -> list[int]:
        self._note("SEARCH", criteria[0])
        msgs = self._messages()
        if criteria[0] == "SINCE":
            since: date = criteria[1]
            return [m.uid for m in msgs if m.internaldate.date() >= since]
        assert criteria[0] == "HEADER", criteria
        name, value = criteria[1], criteria[2]
        return [m.uid for m in msgs if any(value in v for v in m.header(name))]

    def gmail_search(self, query: str) -> list[int]:
        self._note("X-GM-RAW", query)
        assert b"X-GM-EXT-1" in self.server.capabilities
        wanted = query.removeprefix("rfc822msgid:")
        return [
            m.uid
            for m in self._messages()
            if any(v.strip().strip("<>") == wanted for v in m.header("Message-ID"))
        ]

    def fetch(self, uids: list[int], items: list[str]) -> dict[int, dict[bytes, Any]]:
        self._note("FETCH", len(uids))
        assert len(items) == 2 and items[0].startswith("BODY.PEEK[HEADER.FIELDS ("), items
        assert items[1] == "INTERNALDATE"
        fields = items[0].split("(", 1)[1].rstrip(")]").split()
        msgs = {m.uid: m for m in self._messages()}
        out = {}
        for uid in uids:
            m = msgs[uid]
            lines = [f"{name}: {v}\r\n".encode() for name in fields for v in m.header(name)]
            key = f"BODY[HEADER.FIELDS ({' '.join(fields)})]".encode()
            out[uid] = {key: b"".join(lines) + b"\r\n", b"INTERNALDATE": m.internaldate}
        return out

    def logout(self) -> None:
        self._note("LOGOUT")

    def shutdown(self) -> None:
        pass
