"""The relay's records, declared once: what the spool stores and the delivery log says.

On disk (docs/spool.md): the envelope at the end of `<id>.msg` (with its routing
plan), the JSON lines of `<id>.state`, the requests in `control/`. Each has one
`parse_*` function that every reader goes through and that raises `RecordError`
for anything malformed, so the rest of the code sees typed values only. The
JSON is envelope version 1's, byte for byte (but for the `"r": null` it wrote
when a never-tried delivery was retried, now left out): spools written before
these types existed read back unchanged (tests/test_records.py). Keys added
since (the RFC 3461 parameters `ret`, `envid`, a plan entry's `notify` and
`orcpt`, a state line's `w`) are written only when they have a value, so a
record without them is version 1's and an older spool reads as it always did.

Frozen slotted dataclasses written with the json module, not pydantic models:
addresses can hold lone surrogates (the SMTP engine decodes with surrogateescape),
which pydantic's JSON reader and writer refuse and json escapes. Measured here
for a two-delivery envelope: built and serialised in 9.8 µs (6.5 µs as the plain
dict before), parsed and validated in 16 µs (json.loads alone: 4.4 µs), which
happens only when a spool is read back.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast, get_args

from relay import jsonenc
from relay.config import PilotMode

ENVELOPE_VERSION = 1

# the state lines before orjson (relay/jsonenc.py): ASCII, json's float form
_COMPACT = json.JSONEncoder(separators=(",", ":"))

# `archive`: the copy relay/archive writes (SPEC Part 2 "Safety net"), no SMTP
Provider = Literal["legacy", "new", "bounce", "archive"]
# `replay`: a copy `relay replay` sent again from the archive; never bounces
Role = Literal["primary", "shadow", "replay"]
Status = Literal["pending", "deferred", "delivered", "bounced", "expired", "deleted"]
PROVIDERS: tuple[Provider, ...] = get_args(Provider)
ROLES: tuple[Role, ...] = get_args(Role)
MODES: tuple[PilotMode, ...] = get_args(PilotMode)
STATUSES: tuple[Status, ...] = get_args(Status)
FINAL: frozenset[Status] = frozenset({"delivered", "bounced", "expired", "deleted"})
_T = TypeVar("_T")


class RecordError(ValueError):
    """A stored record that is not what its type says: wrong shape, type or value."""


class PlanDict(TypedDict):
    """A plan entry as JSON (in the envelope, the `received` event and `relay queue show`)."""

    rcpt: str
    provider: Provider
    delivered_to: str
    role: Role
    group: str | None
    mode: PilotMode | None
    pilot: bool


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One delivery the routing decided at acceptance: a recipient at one provider."""

    rcpt: str  # as the client wrote it
    provider: Provider
    delivered_to: str  # the address given to the provider
    role: Role
    group: str | None
    mode: PilotMode | None
    pilot: bool
    # the recipient's RFC 3461 parameters (relay/dsn.py); in the envelope only when given
    notify: str | None = None
    orcpt: str | None = None

    def to_dict(self) -> PlanDict:
        return {
            "rcpt": self.rcpt, "provider": self.provider, "delivered_to": self.delivered_to,
            "role": self.role, "group": self.group, "mode": self.mode, "pilot": self.pilot,
        }  # fmt: skip

    def to_record(self) -> dict[str, Any]:
        """The entry as the envelope stores it: `to_dict`, and the DSN parameters given."""
        record: dict[str, Any] = dict(self.to_dict())
        for key, value in (("notify", self.notify), ("orcpt", self.orcpt)):
            if value is not None:
                record[key] = value
        return record


AuthClass = Literal["aligned_pass", "auth_no_policy", "none", "fail", "temperror"]
AUTH_CLASSES: tuple[AuthClass, ...] = get_args(AuthClass)


class DkimDict(TypedDict):
    domain: str  # d=, "" when the signature was too broken to name one
    result: str  # RFC 8601 dkim result: pass, fail, neutral, temperror, permerror


# A verdict as JSON (in the envelope and the `received` event): domains only, no local
# parts. The functional form because "class" is a Python keyword.
AuthDict = TypedDict(
    "AuthDict",
    {
        "spf": str, "spf_domain": str | None, "dkim": list[DkimDict], "dmarc": str,
        "dmarc_policy": str | None, "arc": str, "from_domain": str | None, "class": AuthClass,
    },
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """SPF, DKIM, DMARC and ARC as the relay judged them at the end of DATA (relay/auth/)."""

    spf: str
    spf_domain: str | None  # the domain SPF checked: MAIL FROM's, or HELO's for <>
    dkim: tuple[tuple[str, str], ...]  # (domain, result) per signature, in header order
    dmarc: str
    dmarc_policy: str | None  # the published p= (or sp=) that applied; None: no record
    arc: str
    from_domain: str | None
    auth_class: AuthClass

    def to_dict(self) -> AuthDict:
        return {
            "spf": self.spf, "spf_domain": self.spf_domain,
            "dkim": [{"domain": d, "result": r} for d, r in self.dkim], "dmarc": self.dmarc,
            "dmarc_policy": self.dmarc_policy, "arc": self.arc, "from_domain": self.from_domain,
            "class": self.auth_class,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the spool keeps with a message's content: the SMTP envelope and the plan."""

    queue_id: str
    received: str  # RFC 3339 UTC, as in the delivery log
    received_epoch: float
    mail_from: str  # "" for the null sender
    rcpts: tuple[str, ...]
    options: tuple[str, ...]  # MAIL parameters passed on: BODY=8BITMIME, SMTPUTF8
    client_ip: str | None  # None for a DSN
    message_id: str | None
    size: int
    forwarded: bool
    plan: tuple[PlanEntry, ...]
    dsn: bool
    dsn_for: str | None = None  # a DSN's original message (the key exists only then)
    ret: str | None = None  # RFC 3461 RET (FULL | HDRS) and ENVID, decoded; keys only when given
    envid: str | None = None
    auth: AuthVerdict | None = None  # with auth.verify (the key exists only then)
    # header fields put above the spooled content when sending, per provider: our
    # Authentication-Results and ARC set (the key exists only when there are some)
    prepend: tuple[tuple[Provider, str], ...] = ()

    def prepended(self, provider: Provider) -> bytes:
        """The header fields to send above the content to `provider` (b"" for none)."""
        return "".join(text for p, text in self.prepend if p == provider).encode("ascii")

    def to_json(self) -> bytes:
        """The stored form; the keys in version 1's order."""
        record: dict[str, Any] = {
            "v": ENVELOPE_VERSION, "queue_id": self.queue_id, "received": self.received,
            "received_epoch": self.received_epoch, "mail_from": self.mail_from,
            "rcpts": list(self.rcpts), "options": list(self.options),
            "client_ip": self.client_ip, "message_id": self.message_id, "size": self.size,
            "forwarded": self.forwarded, "plan": [p.to_record() for p in self.plan],
            "dsn": self.dsn,
        }  # fmt: skip
        for key, value in (("dsn_for", self.dsn_for), ("ret", self.ret), ("envid", self.envid)):
            if value is not None:
                record[key] = value
        if self.auth is not None:
            record["auth"] = self.auth.to_dict()
        if self.prepend:
            record["prepend"] = dict(self.prepend)
        return jsonenc.record(record)


@dataclass(frozen=True, slots=True)
class StateLine:
    """One delivery's state change, a line of `<id>.state`; later lines win.

    `n`, `due` and `r` may be absent (None here; a delete records neither due
    time nor reply): the delivery keeps its attempts and last reply, and its due
    time is 0. Version 1 also wrote `"r": null`, which reads the same.
    """

    index: int  # the delivery's position in the plan
    status: Status
    attempts: int | None = None
    due: float | None = None
    reply: str | None = None
    warned: bool = False  # a delay warning (DSN) was sent; key `w` only when true

    def to_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {"i": self.index, "s": self.status}
        for key, value in (("n", self.attempts), ("due", self.due), ("r", self.reply)):
            if value is not None:
                line[key] = value
        if self.warned:
            line["w"] = True
        return line

    def to_line(self) -> bytes:
        """The line as written: JSON with a CRC-32 of itself in `c`, and LF.

        A line that fails its checksum is a flipped bit, not a torn write (that is
        the tail after the last LF), so its message is set aside in corrupt/:
        without it, `"i":0` flipped to `"i":1` would mark the wrong delivery done.
        """
        body = jsonenc.record(self.to_dict())
        return body[:-1] + b',"c":%d}\n' % zlib.crc32(body)


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """`relay queue retry|delete` asking the running relay (a file in `control/`)."""

    op: str  # checked by the relay, which answers an unknown one with an error
    queue_id: str | None
    provider: str | None

    def to_json(self) -> str:
        return json.dumps({"op": self.op, "queue_id": self.queue_id, "provider": self.provider})


class ControlAnswer(TypedDict, total=False):
    count: int  # deliveries made due, or deleted
    error: str


# -- the delivery log's events (SPEC "Delivery log"); DeliveryLog.emit checks them ------

Event = Literal[
    "received", "discarded", "rejected", "delivery", "deleted", "bounce_sent",
    "log_events_dropped", "replayed", "archive_purged",
    "placement",
]  # fmt: skip
EVENTS: tuple[Event, ...] = get_args(Event)


class ReceivedEvent(TypedDict):
    queue_id: str
    message_id: str | None
    mail_from: str
    client_ip: str | None
    size: int
    rcpts: list[str]
    plan: list[PlanDict]
    forwarded: bool
    message_id_added: NotRequired[bool]  # the relay added the Message-ID (SPEC Part 2)
    auth: NotRequired[AuthDict]  # with auth.verify


class DiscardedEvent(TypedDict):
    queue_id: str
    rcpt: str
    reason: str


class RejectedEvent(TypedDict):
    client_ip: str
    stage: str
    smtp_code: int
    enhanced_code: str
    reason: str
    # what the session had said, escaped (SPEC Part 2 "Hostile input")
    helo: NotRequired[str]
    mail_from: NotRequired[str]
    rcpt: NotRequired[str]
    rcpts: NotRequired[list[str]]
    count: NotRequired[int]  # a session's summary of refusals not logged one by one


class DeliveryEvent(PlanDict):
    queue_id: str
    outcome: Status
    smtp_code: int | None
    enhanced_code: str | None
    smtp_response: str
    attempt: int
    latency_ms: int
    tls: str | None
    remote_id: str | None
    by: NotRequired[str]  # "relay": a refusal the relay decided, not the provider


class DeletedEvent(TypedDict):
    queue_id: str
    rcpt: str
    provider: str


class BounceSentEvent(TypedDict):
    queue_id: str
    rcpt: str
    dsn_queue_id: str
    action: NotRequired[Literal["delayed", "relayed"]]  # a DSN that is not a bounce


class LogEventsDroppedEvent(TypedDict):
    """Written by the log itself once writing resumes (relay/log.py)."""

    count: int
    since: str | None
    until: str


class ReplayedEvent(TypedDict):
    """`relay replay` queued `queue_id`, a new message, for one pair of an archived one."""

    queue_id: str
    original_node: str
    original_queue_id: str
    rcpt: str
    provider: str
    delivered_to: str
    group: str | None


class ArchivePurgedEvent(TypedDict):
    """Archived messages removed: by retention (daily) or by `relay archive delete`."""

    count: int
    bytes: int
    reason: Literal["retention", "request"]
    before: str | None  # retention: messages received before this instant


# -- parsing ------------------------------------------------------------------------------


def _object(raw: bytes | str | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(raw, bytes | str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError included
            raise RecordError(f"{what}: not JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise RecordError(f"{what}: not a JSON object")
    return raw


class _Fields:
    """Typed reads of one JSON object's fields; every failure is a RecordError."""

    def __init__(self, obj: Mapping[str, Any], what: str):
        self.obj = obj
        self.what = what

    def value(self, key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        """The field, of one of `kinds`; None when absent and `optional`."""
        if key not in self.obj:
            if optional:
                return None
            raise RecordError(f"{self.what}: {key!r} missing")
        value = self.obj[key]
        # a bool is an int to Python, never to a record
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise RecordError(f"{self.what}: {key!r} is {value!r}, not {names}")
        return value

    def text(self, key: str) -> str:
        return cast(str, self.value(key, (str,)))

    def text_or_none(self, key: str, optional: bool = False) -> str | None:
        return cast(str | None, self.value(key, (str, type(None)), optional))

    def optional_text(self, key: str) -> str | None:
        """A string key that exists only when it has a value."""
        return cast(str | None, self.value(key, (str,), optional=True))

    def flag(self, key: str) -> bool:
        return cast(bool, self.value(key, (bool,)))

    def count(self, key: str, optional: bool = False) -> int | None:
        value = self.value(key, (int,), optional)
        if value is not None and value < 0:
            raise RecordError(f"{self.what}: {key!r} is negative ({value})")
        return cast(int | None, value)

    def number(self, key: str, optional: bool = False) -> float | None:
        value = self.value(key, (int, float), optional)
        if value is not None and not math.isfinite(value):
            raise RecordError(f"{self.what}: {key!r} is {value!r}, not a finite number")
        return None if value is None else float(value)

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.value(key, (list,))
        if not all(isinstance(v, str) for v in value):
            raise RecordError(f"{self.what}: {key!r} holds a non-string")
        return tuple(value)

    def choice(self, key: str, choices: tuple[str | None, ...]) -> Any:
        """The value, as the one object `choices` holds (a deep queue keeps a few
        shared strings, not one copy per record)."""
        value = self.value(key, (str, type(None)))
        if value not in choices:
            raise RecordError(f"{self.what}: {key!r} is {value!r}, not one of {choices}")
        return choices[choices.index(value)]


def fields(raw: bytes | str | Mapping[str, Any], what: str) -> _Fields:
    """Typed reads of one JSON object, for records declared beside their only user
    (the archive's index and file header, relay/archive/store.py)."""
    return _Fields(_object(raw, what), what)


def _required(value: _T | None) -> _T:
    assert value is not None  # a field read without optional=True is never None
    return value


def parse_plan_entry(raw: Mapping[str, Any], what: str = "plan entry") -> PlanEntry:
    f = _Fields(_object(raw, what), what)
    return PlanEntry(
        f.text("rcpt"), f.choice("provider", PROVIDERS), f.text("delivered_to"),
        f.choice("role", ROLES), f.text_or_none("group"), f.choice("mode", (*MODES, None)),
        f.flag("pilot"), f.optional_text("notify"), f.optional_text("orcpt"),
    )  # fmt: skip


def _envelope_fields(
    raw: bytes | str | Mapping[str, Any],
) -> tuple[Mapping[str, Any], _Fields, list[Any]]:
    """An envelope record of the known version: (the object, its fields, its plan)."""
    obj = _object(raw, "envelope")
    version = obj.get("v")
    if version != ENVELOPE_VERSION or isinstance(version, bool):
        raise RecordError(f"unknown envelope version {version!r}")
    f = _Fields(obj, "envelope")
    return obj, f, f.value("plan", (list,))


def parse_envelope(raw: bytes | str | Mapping[str, Any]) -> Envelope:
    """The envelope record of a `.msg` file: of a known version, complete, well typed."""
    obj, f, plan = _envelope_fields(raw)
    return Envelope(
        queue_id=f.text("queue_id"), received=f.text("received"),
        received_epoch=_required(f.number("received_epoch")), mail_from=f.text("mail_from"),
        rcpts=f.texts("rcpts"), options=f.texts("options"), client_ip=f.text_or_none("client_ip"),
        message_id=f.text_or_none("message_id"), size=_required(f.count("size")),
        forwarded=f.flag("forwarded"),
        plan=tuple(parse_plan_entry(p, f"envelope plan[{i}]") for i, p in enumerate(plan)),
        dsn=f.flag("dsn"), dsn_for=f.optional_text("dsn_for"), ret=f.optional_text("ret"),
        envid=f.optional_text("envid"),
        auth=None if "auth" not in obj else parse_auth(obj["auth"]), prepend=_prepend(obj),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outline:
    """What queueing a recovered message in short form needs of its envelope (the
    rest is read, and checked, when its next attempt loads it)."""

    received_epoch: float
    providers: tuple[Provider, ...]  # each plan entry's, in plan order


def parse_outline(raw: bytes) -> Outline:
    """An envelope record's outline: version, arrival and each plan entry's provider
    checked; half the cost of parse_envelope on a deep queue's restart."""
    _, f, plan = _envelope_fields(raw)
    providers = tuple(
        _Fields(_object(p, "plan entry"), f"envelope plan[{i}]").choice("provider", PROVIDERS)
        for i, p in enumerate(plan)
    )
    return Outline(_required(f.number("received_epoch")), providers)


def _prepend(obj: Mapping[str, Any]) -> tuple[tuple[Provider, str], ...]:
    raw = _object(obj.get("prepend", {}), "envelope prepend")
    f = _Fields(raw, "envelope prepend")
    for key in raw:
        if key not in PROVIDERS:
            raise RecordError(f"envelope prepend: unknown provider {key!r}")
        if not f.text(key).isascii():
            raise RecordError(f"envelope prepend: {key!r} is not ASCII")
    return tuple((cast(Provider, key), f.text(key)) for key in raw)


def parse_auth(raw: bytes | str | Mapping[str, Any], what: str = "auth") -> AuthVerdict:
    """A verdict as the envelope and the `received` event hold it."""
    f = _Fields(_object(raw, what), what)
    dkim = []
    for i, sig in enumerate(f.value("dkim", (list,))):
        g = _Fields(_object(sig, f"{what} dkim[{i}]"), f"{what} dkim[{i}]")
        dkim.append((g.text("domain"), g.text("result")))
    return AuthVerdict(
        spf=f.text("spf"), spf_domain=f.text_or_none("spf_domain"), dkim=tuple(dkim),
        dmarc=f.text("dmarc"), dmarc_policy=f.text_or_none("dmarc_policy"), arc=f.text("arc"),
        from_domain=f.text_or_none("from_domain"), auth_class=f.choice("class", AUTH_CLASSES),
    )  # fmt: skip


def parse_state_line(raw: bytes | str | Mapping[str, Any], plan_size: int) -> StateLine:
    """One line of a `.state` file of a message whose plan has `plan_size` deliveries.

    Lines since version 2 carry their CRC-32 in `c` (see StateLine.to_line); a
    version-1 line has none and is read as it was written."""
    obj = _object(raw, "state line")
    if isinstance(raw, bytes) and _crc_as_written(raw):  # as to_line wrote it: no re-encoding
        obj = {k: v for k, v in obj.items() if k != "c"}
    elif "c" in obj:
        body = dict(obj)
        crc = body.pop("c")
        # as written now, or as before orjson
        expected = (zlib.crc32(jsonenc.record(body)), zlib.crc32(_COMPACT.encode(body).encode()))
        if type(crc) is not int or crc not in expected:
            raise RecordError("state line: checksum mismatch")
        obj = body
    f = _Fields(obj, "state line")
    index = _required(f.count("i"))
    if index >= plan_size:
        raise RecordError(f"state line: delivery {index} is not in the plan of {plan_size}")
    return StateLine(
        index, f.choice("s", STATUSES), f.count("n", optional=True),
        f.number("due", optional=True), f.text_or_none("r", optional=True),
        "w" in obj and f.flag("w"),
    )  # fmt: skip


_CRC_TAIL = re.compile(rb',"c":(\d+)}\n?$')


def _crc_as_written(raw: bytes) -> bool:
    """The line's `c` is the CRC-32 of its own bytes without it (StateLine.to_line)."""
    m = _CRC_TAIL.search(raw)
    return m is not None and zlib.crc32(raw[: m.start()] + b"}") == int(m.group(1))


def parse_control_answer(raw: bytes | str | Mapping[str, Any]) -> ControlAnswer:
    """The running relay's answer to a request: a count, or an error."""
    f = _Fields(_object(raw, "answer"), "answer")
    count, error = f.count("count", optional=True), f.value("error", (str,), optional=True)
    if (count is None) == (error is None):
        raise RecordError("answer: neither a count nor an error")
    return {"count": count} if count is not None else {"error": error}


def parse_control_request(raw: bytes | str | Mapping[str, Any]) -> ControlRequest:
    """A request file of `control/` (the operation is checked by who carries it out)."""
    f = _Fields(_object(raw, "request"), "request")
    return ControlRequest(
        f.text("op"),
        f.text_or_none("queue_id", optional=True),
        f.text_or_none("provider", optional=True),
    )
