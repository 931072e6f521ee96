"""The IMAP method: one read-only session in one mailbox, finding copies by their headers.

Built on IMAPClient (synchronous; the daemon runs each session in a thread).
Folders are only ever opened with EXAMINE and messages read with
`BODY.PEEK[HEADER.FIELDS (...)]` plus INTERNALDATE: no body, no subject, and
no flag is ever set (PEEK leaves `\\Seen` alone). Every command goes through
`ReadOnlyImap`, which offers nothing else, so a write cannot slip in. The one
exception is `CanaryEraser`: deleting a verified canary, by its folder and UID,
in a canary mailbox only (`canary.delete_after_verify`; the daemon decides).
IDLE (RFC 2177) in an EXAMINEd folder is read-only too: it only waits for the
server to say a message came (relay/probe/watch.py, the canary mailboxes).

How a copy is found (SPEC Part 2): by Message-ID (Gmail's `X-GM-RAW
rfc822msgid:` when `X-GM-EXT-1` is offered), confirmed by our X-Relay-Trace;
what that misses, by one `SEARCH SINCE` sweep of Inbox and the junk folders
matched on X-Relay-Trace locally. When many copies are due in one mailbox the
sweep comes first: one search and one fetch per folder instead of one search
per message and folder.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from relay.log import utc_ts
from relay.probe.config import DEFAULT_JUNK_NAMES, ProbeProvider
from relay.probe.errors import ProbeError
from relay.probe.tokens import TokenSource
from relay.probe.verdict import parse_verdict

HEADER_FIELDS = (
    "MESSAGE-ID",
    "X-RELAY-TRACE",
    "X-RELAY-CANARY",
    "AUTHENTICATION-RESULTS",
    "X-FOREFRONT-ANTISPAM-REPORT",
    "X-SPAM-FLAG",
    "X-SPAM-STATUS",
)
FETCH_ITEMS = [f"BODY.PEEK[HEADER.FIELDS ({' '.join(HEADER_FIELDS)})]", "INTERNALDATE"]
# More copies due in one mailbox than this: sweep first, search one by one only what is left.
SEARCH_EACH_MAX = 3
FETCH_CHUNK = 500
IDLE_SLICE = 1.0  # seconds per wait inside IDLE, so a stop is seen within one
# Folders that hold copies of mail filed elsewhere, or mail the user wrote.
NOT_SEARCHED = {b"\\noselect", b"\\nonexistent", b"\\all", b"\\flagged", b"\\important",
                b"\\sent", b"\\drafts"}  # fmt: skip

ClientFactory = Callable[..., Any]
Hit = tuple[int, Message, str | None]  # UID, header fields, INTERNALDATE


@dataclass(frozen=True)
class Wanted:
    """One copy to find: who asks (`key`), its Message-ID, our trace, the day to sweep from."""

    key: str
    message_id: str | None
    trace: str  # "NODE QUEUEID", as in the X-Relay-Trace header
    since: date


@dataclass(frozen=True)
class Found:
    folder: str  # inbox | junk | other
    name: str  # the folder's name in the mailbox
    match: str  # message_id | trace | sweep
    provider_time: str | None  # INTERNALDATE, RFC 3339 UTC
    verdict: dict[str, Any]
    uid: int = 0  # in `name`, under `uidvalidity`: what a canary's deletion names
    uidvalidity: int | None = None
    canary: str | None = None  # the X-Relay-Canary header's id, when the copy has one


@dataclass(frozen=True)
class Folders:
    inbox: str
    junk: tuple[str, ...]
    junk_source: str  # SPECIAL-USE | names | configured
    other: tuple[str, ...]

    def searched(self, kinds: Sequence[str]) -> list[tuple[str, str]]:
        order = [(self.inbox, "inbox"), *((j, "junk") for j in self.junk),
                 *((o, "other") for o in self.other)]  # fmt: skip
        return [(name, kind) for name, kind in order if kind in kinds]


@dataclass
class Transcript:
    """The commands this session sent (names and folders, never arguments with addresses)."""

    commands: list[str] = field(default_factory=list)
    listener: Callable[[str], None] | None = None  # told of each command as it is sent

    def note(self, command: str) -> None:
        self.commands.append(command)
        if self.listener is not None:
            self.listener(command)


class ReadOnlyImap:
    """The only IMAP operations the probe has: nothing here can write to a mailbox."""

    def __init__(self, client: Any, transcript: Transcript):
        self._c = client
        self.transcript = transcript
        self.selected: str | None = None
        self.uidvalidity: int | None = None

    @property
    def capabilities(self) -> tuple[bytes, ...]:
        return tuple(self._c.capabilities())

    def list_folders(self) -> list[tuple[tuple[bytes, ...], str]]:
        self.transcript.note("LIST")
        return [(tuple(flags), name) for flags, _, name in self._c.list_folders()]

    def examine(self, folder: str) -> None:
        if self.selected != folder:
            self.transcript.note("EXAMINE")
            answer = self._c.select_folder(folder, readonly=True)
            self.selected = folder
            self.uidvalidity = _uidvalidity(answer)

    def search(self, criteria: list[Any]) -> list[int]:
        self.transcript.note("UID SEARCH")
        return list(self._c.search(criteria))

    def gmail_search(self, query: str) -> list[int]:
        self.transcript.note("UID SEARCH X-GM-RAW")
        return list(self._c.gmail_search(query))

    def idle(self, seconds: float, stop: threading.Event) -> bool:
        """IDLE in the examined folder for up to `seconds` or until `stop`; True when the
        server told of a new message (an untagged EXISTS)."""
        self.transcript.note("IDLE")
        self._c.idle()
        came = False
        deadline = time.monotonic() + seconds
        while not (came or stop.is_set()) and (left := deadline - time.monotonic()) > 0:
            wait, began = min(left, IDLE_SLICE), time.monotonic()
            responses = self._c.idle_check(timeout=wait)
            if not responses and time.monotonic() - began < wait / 2:
                # IMAPClient answers a connection closed under it with nothing, at once
                raise ProbeError("connect", "connection closed in IDLE")
            came = _exists(responses)
        self.transcript.note("DONE")
        _, responses = self._c.idle_done()  # not after an error: the connection is dropped
        return came or _exists(responses)

    def fetch_headers(self, uids: Sequence[int]) -> Iterator[tuple[int, Message, str | None]]:
        """(UID, header fields, INTERNALDATE) of each message, fetched in chunks."""
        for i in range(0, len(uids), FETCH_CHUNK):
            self.transcript.note("UID FETCH")
            answer = self._c.fetch(list(uids[i : i + FETCH_CHUNK]), FETCH_ITEMS)
            for uid, data in answer.items():
                raw = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER")), b"")
                when = data.get(b"INTERNALDATE")
                yield uid, _headers(raw or b""), _internaldate(when)


class CanaryEraser:
    """The probe's one write: delete a verified canary copy, exactly its UID, nothing else.

    Separate from `ReadOnlyImap` so no finding code can reach it; the daemon
    opens it only in the canary mailboxes. A changed UIDVALIDITY means the UID
    may name another message now, so the copy is left alone.
    """

    def __init__(self, client: Any, transcript: Transcript):
        self._c = client
        self.transcript = transcript

    def delete(self, found: Found) -> bool:
        """True when the copy was expunged; False when its folder's UIDs changed meanwhile."""
        self.transcript.note("SELECT")
        answer = self._c.select_folder(found.name, readonly=False)
        if found.uidvalidity is not None and _uidvalidity(answer) != found.uidvalidity:
            return False
        self.transcript.note("UID STORE")
        self._c.add_flags([found.uid], [b"\\Deleted"], silent=True)
        if b"UIDPLUS" in tuple(self._c.capabilities()):
            self.transcript.note("UID EXPUNGE")
            self._c.uid_expunge([found.uid])
        else:  # also expunges whatever else was marked \Deleted in that folder
            self.transcript.note("EXPUNGE")
            self._c.expunge()
        return True


def _exists(responses: Sequence[Any]) -> bool:
    return any(isinstance(r, tuple) and len(r) > 1 and r[1] == b"EXISTS" for r in responses)


def _uidvalidity(answer: Any) -> int | None:
    value = answer.get(b"UIDVALIDITY") if isinstance(answer, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int | bytes | str) else None


def _headers(raw: bytes) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(raw)


def _internaldate(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None
    return utc_ts(value if value.tzinfo else value.replace(tzinfo=UTC))


def _traces(headers: Message) -> set[str]:
    return {" ".join(str(v).split()) for v in headers.get_all("X-Relay-Trace") or []}


def tls_context(settings: ProbeProvider) -> ssl.SSLContext:
    """Verified TLS, with the configured extra CA bundle (a loopback test's own CA)."""
    ctx = ssl.create_default_context()
    if settings.ca_file is not None:
        ctx.load_verify_locations(cafile=str(settings.ca_file))
    return ctx


def resolve_folders(imap: ReadOnlyImap, settings: ProbeProvider) -> Folders:
    """Inbox, the junk folders (SPECIAL-USE `\\Junk`, else known names) and the rest."""
    listed = imap.list_folders()
    names = {name.lower(): name for _, name in listed}
    inbox = names.get("inbox", "INBOX")
    if settings.junk_folders != "auto":
        junk = tuple(names[n.lower()] for n in settings.junk_folders if n.lower() in names)
        source = "configured"
    else:
        junk = tuple(name for flags, name in listed if b"\\junk" in {f.lower() for f in flags})
        source = "SPECIAL-USE"
        if not junk:  # Exchange's localised "Junk Email" carries no SPECIAL-USE flag
            junk = tuple(names[n.lower()] for n in DEFAULT_JUNK_NAMES if n.lower() in names)
            source = "names"
    other = tuple(
        name
        for flags, name in listed
        if name != inbox and name not in junk and not NOT_SEARCHED & {f.lower() for f in flags}
    )
    return Folders(inbox, junk, source, other)


class ImapSession:
    """One login to one mailbox; `find` looks for copies; closing logs out."""

    def __init__(
        self,
        settings: ProbeProvider,
        login: str,
        tokens: TokenSource | None = None,
        client_factory: ClientFactory = IMAPClient,
    ):
        self.settings = settings
        self.login = login
        self.tokens = tokens
        self.transcript = Transcript()
        self._factory = client_factory
        self._client: Any = None
        self.imap: ReadOnlyImap | None = None
        self._folders: Folders | None = None

    def __enter__(self) -> ImapSession:
        try:
            with mapped_errors():
                self._open()
        except BaseException:
            self.close()  # a refused login still leaves a connection to close
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        s = self.settings
        ctx = tls_context(s) if s.tls != "none" else None
        self.transcript.note("CONNECT")
        self._client = self._factory(
            s.host, port=s.port, ssl=s.tls == "implicit", ssl_context=ctx, timeout=s.timeout
        )
        self._client.normalise_times = False  # INTERNALDATE with its offset
        if s.tls == "starttls":
            self.transcript.note("STARTTLS")
            self._client.starttls(ctx)
        if s.auth == "xoauth2":
            assert self.tokens is not None
            token = self.tokens.token(self.login)
            self.transcript.note("AUTHENTICATE XOAUTH2")
            self._client.oauth2_login(self.login, token)
        else:
            self.transcript.note("LOGIN")
            self._client.login(self.login, s.password() or "")
        self.imap = ReadOnlyImap(self._client, self.transcript)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            self.transcript.note("LOGOUT")
            client.logout()
        except Exception:  # the session is over either way
            with contextlib.suppress(Exception):
                client.shutdown()

    def folders(self) -> Folders:
        if self._folders is None:
            assert self.imap is not None
            with mapped_errors():
                self._folders = resolve_folders(self.imap, self.settings)
        assert self._folders is not None
        return self._folders

    def find(self, wanted: Sequence[Wanted]) -> dict[str, Found]:
        """Where each wanted copy is (keys of those found); raises ProbeError."""
        folders = self.folders()
        with mapped_errors():
            return _Finder(self.imap, folders, wanted).run()

    def idle_folders(self, most: int) -> tuple[str, ...]:
        """The folders a canary can land in and IDLE can watch: Inbox, then the junk folders
        (at most `most`); none when the server does not offer IDLE."""
        assert self.imap is not None
        with mapped_errors():
            if b"IDLE" not in self.imap.capabilities:
                return ()
        f = self.folders()
        return (f.inbox, *f.junk)[:most]

    def watch(
        self, folder: str, stop: threading.Event, came: Callable[[], None], renew: float
    ) -> None:
        """IDLE in `folder` until `stop`, re-issued every `renew` s; `came()` once at the
        start (what arrived while no session watched) and at each new message."""
        assert self.imap is not None
        with mapped_errors():
            self.imap.examine(folder)
            came()
            while not stop.is_set():
                if self.imap.idle(renew, stop):
                    came()

    def delete(self, copies: Sequence[Found]) -> int:
        """Delete these found copies (canaries, in a canary mailbox); how many went."""
        assert self.imap is not None
        eraser = CanaryEraser(self._client, self.transcript)
        self.imap.selected = None  # read-only again before any later EXAMINE
        with mapped_errors():
            return sum(eraser.delete(f) for f in copies)


class _Finder:
    def __init__(self, imap: ReadOnlyImap | None, folders: Folders, wanted: Sequence[Wanted]):
        assert imap is not None
        self.imap = imap
        self.folders = folders
        self.todo = {w.key: w for w in wanted}
        self.found: dict[str, Found] = {}
        self.gmail = b"X-GM-EXT-1" in imap.capabilities

    def run(self) -> dict[str, Found]:
        if len(self.todo) > SEARCH_EACH_MAX:
            self.sweep()
            self.search_each(("other",))
        else:
            self.search_each(("inbox", "junk", "other"))
            self.sweep()
        return self.found

    def _take(self, w: Wanted, name: str, kind: str, match: str, hit: Hit) -> None:
        uid, h, t = hit
        canary = h.get("X-Relay-Canary")
        self.found[w.key] = Found(
            kind, name, match, t, parse_verdict(h), uid, self.imap.uidvalidity,
            None if canary is None else str(canary).strip(),
        )  # fmt: skip
        del self.todo[w.key]

    def search_each(self, kinds: Sequence[str]) -> None:
        """Per folder, one search per wanted copy (by Message-ID, else by trace)."""
        for name, kind in self.folders.searched(kinds):
            if not self.todo:
                return
            self.imap.examine(name)
            for w in list(self.todo.values()):
                if w.message_id:
                    uids = self._by_message_id(w.message_id)
                    match = "message_id"
                else:
                    uids = self.imap.search(["HEADER", "X-Relay-Trace", w.trace])
                    match = "trace"
                for hit in self.imap.fetch_headers(uids) if uids else ():
                    if w.trace in _traces(hit[1]):
                        self._take(w, name, kind, match, hit)
                        break

    def _by_message_id(self, message_id: str) -> list[int]:
        if self.gmail:
            return self.imap.gmail_search(f"rfc822msgid:{message_id.strip().strip('<>')}")
        return self.imap.search(["HEADER", "Message-ID", message_id])

    def sweep(self) -> None:
        """One SEARCH SINCE and its header fetch per Inbox and junk folder, matched here."""
        for name, kind in self.folders.searched(("inbox", "junk")):
            if not self.todo:
                return
            by_trace = {w.trace: w for w in self.todo.values()}
            since = min(w.since for w in self.todo.values())
            self.imap.examine(name)
            uids = self.imap.search(["SINCE", since])
            for hit in self.imap.fetch_headers(uids):
                for trace in _traces(hit[1]) & by_trace.keys():
                    w = by_trace.pop(trace)
                    self._take(w, name, kind, "sweep", hit)


def _detail(exc: BaseException) -> str:
    """The first line of an error, without the b'...' of IMAPClient's server texts."""
    arg = exc.args[0] if exc.args else ""
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(exc)
    text = text.strip()
    if text.startswith(("b'", 'b"')) and text.endswith(text[1]):
        text = text[2:-1]
    return (text.splitlines() or [type(exc).__name__])[0][:200]


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """IMAPClient's, ssl's and the socket's exceptions as one ProbeError(reason, detail)."""
    try:
        yield
    except ProbeError:
        raise
    except LoginError as exc:
        raise ProbeError("login", _detail(exc)) from None
    except TimeoutError as exc:
        raise ProbeError("timeout", _detail(exc) or "timed out") from None
    except ssl.SSLError as exc:
        raise ProbeError("tls", _detail(exc)) from None
    except IMAPClientError as exc:
        raise ProbeError("protocol", _detail(exc)) from None
    except OSError as exc:
        raise ProbeError("connect", _detail(exc)) from None
