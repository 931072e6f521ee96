"""`relay report`: the legacy-versus-new comparison, computed from delivery logs alone.

The unit is a (message, original recipient) pair. Logs are read line by line
(plain or gzip, detected by magic bytes; several files and several nodes merge,
messages are keyed by (node, queue_id)). Only messages still open are held in
memory: once every planned (recipient, provider) delivery of a message has a
final outcome (and the DSN of a primary failure has been logged), the message is
folded into counters and dropped. Latencies of final deliveries are kept in
compact `array("d")` buffers for the percentiles. See docs/report.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROVIDERS: tuple[str, str] = ("legacy", "new")
_PIDX = {"legacy": 0, "new": 1}

# Outcome categories of a planned (pair, provider) delivery, in display order.
OUTCOMES: tuple[str, ...] = ("delivered", "bounced", "expired", "deleted", "pending")
_O_DELIVERED, _O_BOUNCED, _O_EXPIRED, _O_DELETED, _O_PENDING = range(5)
_FINAL_DELIVERY = {"delivered": _O_DELIVERED, "bounced": _O_BOUNCED, "expired": _O_EXPIRED}
_DELIVERY_OUTCOMES = {"delivered", "deferred", "bounced", "expired"}

NON_PILOT_GROUP = "(non-pilot)"
NO_GROUP = "(none)"

VERDICT_READY = "ready"
VERDICT_NOT_READY = "not ready"
VERDICT_INSUFFICIENT = "insufficient data"

REPORT_VERSION = 1

# Latency histogram of final deliveries (for the HTML chart): inclusive upper
# bounds in ms; one more bucket takes everything above the last bound.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000,
    300_000, 900_000, 3_600_000, 21_600_000, 86_400_000,
)  # fmt: skip
_HOUR_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}")


# --------------------------------------------------------------------------- reasons


@dataclass(frozen=True)
class ReasonRule:
    """One row of the rejection-reason table: first matching row wins.

    `codes` are enhanced-code "subject.detail" pairs (the class digit 4/5 is
    ignored). With `need_both` the code AND the text must match, else either.
    """

    reason: str
    codes: frozenset[str]
    text: re.Pattern[str] | None
    need_both: bool = False

    def matches(self, code: str | None, text: str) -> bool:
        code_ok = code is not None and code in self.codes
        text_ok = self.text is not None and self.text.search(text) is not None
        return (code_ok and text_ok) if self.need_both else (code_ok or text_ok)


# Display label of each reason class, in display order. Keys are stable (JSON).
REASON_LABELS: dict[str, str] = {
    "spam_content": "spam/content",
    "auth_policy": "authentication policy",
    "unknown_user": "unknown user",
    "size": "size",
    "rate_limit": "rate limit",
    "other": "other",
}
REASONS: tuple[str, ...] = tuple(REASON_LABELS)
_RIDX = {r: i for i, r in enumerate(REASONS)}

_I = re.IGNORECASE
REASON_RULES: tuple[ReasonRule, ...] = (
    ReasonRule(
        "auth_policy",
        frozenset({"7.20", "7.21", "7.22", "7.23", "7.24", "7.25", "7.26"}),
        re.compile(r"\b(spf|dkim|dmarc)\b|unauthenticated|sender authentication", _I),
    ),
    ReasonRule(
        "unknown_user",
        frozenset({"1.0", "1.1", "1.10"}),
        re.compile(
            r"user unknown|unknown (user|recipient|mailbox)|no such (user|mailbox|recipient)"
            r"|does ?n[o']t exist|recipient not found|mailbox not found|invalid recipient",
            _I,
        ),
    ),
    ReasonRule(
        "size",
        frozenset({"3.4", "2.3"}),
        re.compile(r"too (large|big)|size limit|exceeds? .{0,30}size|message size", _I),
    ),
    ReasonRule(
        "rate_limit",
        frozenset({"7.28"}),
        re.compile(r"rate.?limit|\brate\b|too many|throttl|slow down", _I),
    ),
    ReasonRule(
        "spam_content",
        frozenset(),
        re.compile(
            r"spam|junk|virus|malware|phish|unsolicited|bulk mail|block ?list|black ?list"
            r"|blocked|reputation|content",
            _I,
        ),
    ),
    ReasonRule("spam_content", frozenset({"7.0", "7.1"}), re.compile(r"policy", _I), True),
)

_ENHANCED_RE = re.compile(r"\b[245]\.(\d{1,3}\.\d{1,3})\b")


_reason_cache: dict[tuple[str | None, str | None], str] = {}


def classify_reason(enhanced_code: str | None, smtp_response: str | None) -> str:
    """The reason class of a refusal or deferral (first matching REASON_RULES row)."""
    if not isinstance(enhanced_code, str):
        enhanced_code = None
    if not isinstance(smtp_response, str):
        smtp_response = None
    key = (enhanced_code, smtp_response)
    hit = _reason_cache.get(key)
    if hit is None:
        if len(_reason_cache) >= 4096:  # replies carrying ids rarely repeat: stay bounded
            _reason_cache.clear()
        hit = _reason_cache[key] = _classify(enhanced_code, smtp_response)
    return hit


def _classify(enhanced_code: str | None, smtp_response: str | None) -> str:
    text = smtp_response or ""
    m = _ENHANCED_RE.search(enhanced_code or "") or _ENHANCED_RE.search(text)
    code = m.group(1) if m else None
    for rule in REASON_RULES:
        if rule.matches(code, text):
            return rule.reason
    return "other"


# --------------------------------------------------------------------------- thresholds


class Thresholds(BaseModel):
    """Readiness thresholds (defaults documented in docs/report.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    min_pairs: int = Field(20, ge=0)
    min_delivery_ratio: float = Field(0.99, ge=0)
    max_p95_increase_ms: int = 60000
    max_divergences: int = Field(0, ge=0)
    max_pending_ratio: float = Field(0.05, ge=0, le=1)


class ReportError(Exception):
    """An input problem worth a usage error (exit 2): missing file, bad thresholds."""


def load_thresholds(path: str | os.PathLike[str]) -> Thresholds:
    """Thresholds from a YAML mapping with the keys of `Thresholds`; unknown keys are errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping of thresholds")
    try:
        return Thresholds.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            key = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{path}: {key}: {msg}")
        raise ReportError("\n".join(msgs)) from None


# --------------------------------------------------------------------------- time bounds


def parse_bound(value: str | datetime | date, *, end: bool = False) -> datetime:
    """A filter bound as an aware UTC datetime.

    RFC 3339 (`Z` or an offset; no offset means UTC) or a plain date. A plain
    date means that day's midnight UTC for `--since`, and for `--until` (`end`)
    the end of that day, i.e. the next midnight (until is always exclusive).
    """
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, date):
        d = value + timedelta(days=1) if end else value
        return datetime.combine(d, time(), UTC)
    else:
        text = value.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            try:
                return parse_bound(date.fromisoformat(text), end=end)
            except ValueError:
                raise ValueError(f"{value!r} is not a valid date") from None
        try:
            t = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
        except ValueError:
            raise ValueError(f"{value!r} is not RFC 3339 or a date") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def _parse_ts(ts: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- report model


@dataclass
class Latency:
    """Nearest-rank percentiles (ms) over final deliveries; None when there are none."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    max: float | None = None


@dataclass
class ProviderStats:
    planned: int = 0
    delivered: int = 0
    bounced: int = 0
    expired: int = 0
    deleted: int = 0
    pending: int = 0
    deferrals: int = 0
    delivery_rate: float | None = None
    first_attempt_success: float | None = None
    latency_ms: Latency = field(default_factory=Latency)
    rejections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    deferral_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


@dataclass
class ScopeStats:
    """Figures for the whole log, one group or one pilot user."""

    name: str
    pairs: int
    pilot_pairs: int
    providers: dict[str, ProviderStats]
    group: str | None = None  # users: their group


@dataclass
class Outcome:
    outcome: str  # delivered | bounced | expired | deleted | pending | "" (not planned)
    smtp_code: int | None = None
    enhanced_code: str | None = None
    smtp_response: str | None = None
    latency_ms: float | None = None
    attempt: int | None = None
    deferrals: int = 0
    reason: str | None = None  # reason class of a refusal


@dataclass
class Divergence:
    node: str
    queue_id: str
    received: str
    rcpt: str
    group: str
    refused_by: str  # "new" or "legacy"
    legacy: Outcome
    new: Outcome


@dataclass
class Verdict:
    group: str
    verdict: str
    reason: str
    compared_pairs: int
    legacy_delivered: int
    new_delivered: int
    delivery_ratio: float | None
    legacy_p95_ms: float | None
    new_p95_ms: float | None
    p95_increase_ms: float | None
    divergences: int  # new refused what legacy delivered
    divergences_legacy_refused: int
    pending_pairs: int
    pending_ratio: float | None


@dataclass
class InputStats:
    files: list[str]
    lines: int = 0
    events: int = 0
    corrupt_lines: int = 0
    orphan_events: int = 0
    late_events: int = 0
    duplicate_deliveries: int = 0
    duplicate_received: int = 0
    unmatched_events: int = 0
    unknown_events: int = 0
    other_provider_events: int = 0
    open_messages: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Totals:
    messages: int = 0
    pairs: int = 0
    pilot_pairs: int = 0
    forwarded_pairs: int = 0
    discarded_pairs: int = 0
    bounces_sent: int = 0
    relay_rejections: int = 0
    first_received: str | None = None
    last_received: str | None = None


@dataclass
class HourCounts:
    """Activity in one UTC hour: pairs finally delivered/refused, by the hour of that event."""

    hour: str  # the hour's start, e.g. "2026-11-25T09:00:00Z"
    delivered: dict[str, int]  # provider -> pairs delivered in this hour
    refused: dict[str, int]  # provider -> pairs bounced or expired in this hour
    relay_rejections: int = 0  # `rejected` events (refused at SMTP by the relay)


@dataclass
class Report:
    inputs: InputStats
    filters: dict[str, str | None]
    thresholds: Thresholds
    totals: Totals
    providers: dict[str, ProviderStats]
    groups: list[ScopeStats]
    users: list[ScopeStats]
    divergences: list[Divergence]
    verdicts: list[Verdict]
    # Chart data (HTML report; not in the JSON document): provider -> pairs per
    # LATENCY_BUCKETS_MS bucket (len + 1 counts), and activity per hour, in order.
    latency_histogram: dict[str, list[int]] = field(default_factory=dict)
    hourly: list[HourCounts] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (stable keys, see docs/report.md)."""
        return {
            "report_version": REPORT_VERSION,
            "inputs": asdict(self.inputs),
            "filters": dict(self.filters),
            "thresholds": self.thresholds.model_dump(),
            "totals": asdict(self.totals),
            "providers": {p: asdict(s) for p, s in self.providers.items()},
            "groups": [_scope_dict(s, "group") for s in self.groups],
            "users": [_scope_dict(s, "user") for s in self.users],
            "divergences": [asdict(d) for d in self.divergences],
            "verdicts": [asdict(v) for v in self.verdicts],
        }


def _scope_dict(s: ScopeStats, kind: str) -> dict[str, Any]:
    d: dict[str, Any] = {kind: s.name}
    if kind == "user":
        d["group"] = s.group
    d["pairs"] = s.pairs
    d["pilot_pairs"] = s.pilot_pairs
    d["providers"] = {p: asdict(ps) for p, ps in s.providers.items()}
    return d


# --------------------------------------------------------------------------- streaming state


class _Final:
    """The final event of one planned delivery."""

    __slots__ = ("attempt", "code", "enhanced", "latency", "outcome", "response", "ts")

    def __init__(self, outcome: int, ev: dict[str, Any]) -> None:
        self.outcome = outcome
        self.ts: str = ev["ts"]
        self.code = _int_or_none(ev.get("smtp_code"))
        enh = ev.get("enhanced_code")
        self.enhanced: str | None = enh if isinstance(enh, str) else None
        resp = ev.get("smtp_response")
        self.response: str | None = resp if isinstance(resp, str) else None
        lat = ev.get("latency_ms")
        self.latency: float | None = (
            float(lat) if isinstance(lat, (int, float)) and not isinstance(lat, bool) else None
        )
        self.attempt = _int_or_none(ev.get("attempt"))


class _Slot:
    """One planned (pair, provider) delivery."""

    __slots__ = ("attempts", "deferrals", "final", "primary")

    def __init__(self, primary: bool) -> None:
        self.primary = primary
        self.final: _Final | None = None
        self.deferrals = 0
        self.attempts = 0


class _Pair:
    __slots__ = ("bounce_seen", "discarded", "group", "included", "pilot", "rcpt", "slots")

    def forwarded(self, msg: _Message) -> bool:
        """A forwarded copy: the message came via forward_domains and legacy is not planned."""
        return msg.forwarded and self.slots[0] is None

    def __init__(self, rcpt: str) -> None:
        self.rcpt = rcpt
        self.group = NON_PILOT_GROUP
        self.pilot = False
        self.slots: list[_Slot | None] = [None, None]
        self.discarded = False
        self.bounce_seen = 0
        self.included = False


class _Message:
    __slots__ = ("forwarded", "in_window", "n_discarded", "n_rcpts", "null_sender", "pairs", "ts")

    def __init__(self, ts: str, forwarded: bool, null_sender: bool, n_rcpts: int) -> None:
        self.ts = ts
        self.forwarded = forwarded
        self.null_sender = null_sender
        self.n_rcpts = n_rcpts
        self.n_discarded = 0
        self.in_window = True
        self.pairs: dict[str, _Pair] = {}


class _Agg:
    """Counters of one provider in one scope."""

    __slots__ = ("counts", "deferrals", "dreasons", "first", "lat", "planned", "rejections")

    def __init__(self) -> None:
        self.planned = 0
        self.counts = [0, 0, 0, 0, 0]  # indexed like OUTCOMES
        self.deferrals = 0
        self.first = 0
        self.lat = array("d")
        self.rejections = [0] * len(REASONS)
        self.dreasons = [0] * len(REASONS)


class _Scope:
    __slots__ = (
        "b_decided",
        "b_legacy_delivered",
        "b_new_delivered",
        "b_pairs",
        "b_pending",
        "div_legacy",
        "div_new",
        "group",
        "pairs",
        "pilot_pairs",
        "prov",
    )

    def __init__(self, group: str | None = None) -> None:
        self.group = group
        self.pairs = 0
        self.pilot_pairs = 0
        self.prov = (_Agg(), _Agg())
        # verdict basis: pilot pairs with a new delivery and a legacy one (or forwarded)
        self.b_pairs = 0
        self.b_decided = 0
        self.b_legacy_delivered = 0
        self.b_new_delivered = 0
        self.b_pending = 0
        self.div_new = 0  # new refused what legacy delivered
        self.div_legacy = 0  # legacy refused what new delivered


def _is_one_of(v: Any, names: Container[str]) -> bool:
    return type(v) is str and v in names


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _hour_key(ts: str) -> str | None:
    """The UTC hour of a timestamp, "YYYY-MM-DDTHH" (None if it does not parse)."""
    if ts.endswith("Z") and _HOUR_RE.match(ts):
        return ts[:13]
    t = _parse_ts(ts)
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H")


# A CSV/pair sink receives one finished pair at a time.
PairSink = Callable[["PairRow"], None]


@dataclass
class PairRow:
    """One (message, recipient) pair as written to CSV."""

    node: str
    queue_id: str
    received: str
    rcpt: str
    group: str
    pilot: bool
    forwarded: bool
    discarded: bool
    legacy: Outcome
    new: Outcome
    divergence: str  # "", "new refused", "legacy refused"


CSV_COLUMNS: tuple[str, ...] = (
    "node",
    "queue_id",
    "received",
    "rcpt",
    "group",
    "pilot",
    "forwarded",
    "discarded",
    *(
        f"{p}_{c}"
        for p in PROVIDERS
        for c in (
            "outcome",
            "code",
            "enhanced",
            "latency_ms",
            "attempt",
            "deferrals",
            "reason",
            "response",
        )
    ),
    "divergence",
)


def _csv_values(row: PairRow) -> list[Any]:
    vals: list[Any] = [
        row.node,
        row.queue_id,
        row.received,
        row.rcpt,
        row.group,
        "true" if row.pilot else "false",
        "true" if row.forwarded else "false",
        "true" if row.discarded else "false",
    ]
    for o in (row.legacy, row.new):
        vals += [
            o.outcome,
            "" if o.smtp_code is None else o.smtp_code,
            o.enhanced_code or "",
            "" if o.latency_ms is None else _num(o.latency_ms),
            "" if o.attempt is None else o.attempt,
            o.deferrals if o.outcome else "",
            o.reason or "",
            o.smtp_response or "",
        ]
    vals.append(row.divergence)
    return vals


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


# --------------------------------------------------------------------------- input files


def _rotation_key(path: str) -> tuple[str, int]:
    """Oldest first within a rotation set: base.jsonl.3.gz, .2, .1, then base.jsonl."""
    name = path[:-3] if path.endswith(".gz") else path
    m = re.fullmatch(r"(.*)\.(\d+)", name)
    if m:
        return (m.group(1), -int(m.group(2)))
    return (name, 0)


def order_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Distinct paths, rotated files of one log oldest first (keeps memory low)."""
    seen: set[str] = set()
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        real = os.path.realpath(s)
        if real not in seen:
            seen.add(real)
            out.append(s)
    return sorted(out, key=_rotation_key)


def check_inputs(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Raise ReportError `PATH: file not found` (etc.) for an unusable input."""
    for p in paths:
        s = os.fspath(p)
        if not os.path.exists(s):
            raise ReportError(f"{s}: file not found")
        if os.path.isdir(s):
            raise ReportError(f"{s}: is a directory")
        if not os.access(s, os.R_OK):
            raise ReportError(f"{s}: permission denied")


def _open_log(path: str) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


# --------------------------------------------------------------------------- builder


class _Builder:
    def __init__(
        self,
        since: datetime | None,
        until: datetime | None,
        group: str | None,
        sink: PairSink | None,
    ) -> None:
        self.since = since
        self.until = until
        self.group = group
        self.sink = sink
        self.open: dict[tuple[str, str], _Message] = {}
        self.orphans: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.closed = array("q")  # hash((node, queue_id)) of closed messages
        self.overall = _Scope()
        self.groups: dict[str, _Scope] = {}
        self.users: dict[str, _Scope] = {}
        self.divergences: list[Divergence] = []
        self.totals = Totals()
        self.stats = InputStats(files=[])
        # chart data: latency buckets per provider, and per hour key
        # [legacy delivered, new delivered, legacy refused, new refused, relay rejections]
        self.lat_hist = ([0] * (len(LATENCY_BUCKETS_MS) + 1), [0] * (len(LATENCY_BUCKETS_MS) + 1))
        self.hours: dict[str, list[int]] = {}

    def _hour(self, ts: str) -> list[int] | None:
        key = _hour_key(ts)
        if key is None:
            return None
        counts = self.hours.get(key)
        if counts is None:
            counts = self.hours[key] = [0, 0, 0, 0, 0]
        return counts

    # -- reading

    def read(self, path: str) -> None:
        self.stats.files.append(path)
        loads = json.JSONDecoder().decode
        handle = self._event
        stats = self.stats
        try:
            with _open_log(path) as f:
                for raw in f:
                    stats.lines += 1
                    try:
                        ev = loads(raw.decode())
                    except ValueError:  # also UnicodeDecodeError
                        if raw.strip():
                            stats.corrupt_lines += 1
                        continue
                    if type(ev) is not dict or not handle(ev):
                        stats.corrupt_lines += 1
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            stats.corrupt_lines += 1
            stats.errors.append(f"{path}: truncated or corrupt gzip data ({exc})")
        except OSError as exc:
            stats.errors.append(f"{path}: {exc.strerror or exc}")

    def _event(self, ev: dict[str, Any]) -> bool:
        """Apply one decoded line; False if it is not a valid event."""
        kind = ev.get("event")
        ts = ev.get("ts")
        node = ev.get("node")
        if type(kind) is not str or type(ts) is not str or type(node) is not str:
            return False
        if kind == "rejected":
            self.stats.events += 1
            if self.group is None and self._ts_in_window(ts):
                self.totals.relay_rejections += 1
                hour = self._hour(ts)
                if hour is not None:
                    hour[4] += 1
            return True
        qid = ev.get("queue_id")
        if type(qid) is not str:
            return False
        key = (node, qid)
        if kind == "received":
            if not self._valid_received(ev):
                return False
            self.stats.events += 1
            self._received(key, ev)
            return True
        if kind == "delivery" or kind == "deleted":
            prov = ev.get("provider")
            # a `deleted` event may omit its provider (every provider); otherwise a name
            if type(ev.get("rcpt")) is not str or not (
                type(prov) is str or (kind == "deleted" and prov is None)
            ):
                return False
            if kind == "delivery" and not _is_one_of(ev.get("outcome"), _DELIVERY_OUTCOMES):
                return False
            if prov is not None and prov not in _PIDX:  # e.g. the DSNs' "bounce" route
                self.stats.events += 1
                self.stats.other_provider_events += 1
                return True
        elif kind in ("bounce_sent", "discarded"):
            if type(ev.get("rcpt")) is not str:
                return False
        else:
            self.stats.unknown_events += 1
            return True
        self.stats.events += 1
        msg = self.open.get(key)
        if msg is None:
            self.orphans.setdefault(key, []).append(ev)
            return True
        self._apply(msg, ev)
        if self._is_closed(msg):
            self._close(key, msg)
        return True

    @staticmethod
    def _valid_received(ev: dict[str, Any]) -> bool:
        plan = ev.get("plan")
        if type(plan) is not list:
            return False
        for e in plan:
            if type(e) is not dict or type(e.get("rcpt")) is not str:
                return False
            if type(e.get("provider")) is not str:
                return False
        rcpts = ev.get("rcpts", [])
        return type(rcpts) is list

    def _ts_in_window(self, ts: str) -> bool:
        if self.since is None and self.until is None:
            return True
        t = _parse_ts(ts)
        if t is None:
            return False
        if self.since is not None and t < self.since:
            return False
        return not (self.until is not None and t >= self.until)

    # -- message life cycle

    def _received(self, key: tuple[str, str], ev: dict[str, Any]) -> None:
        if key in self.open:
            self.stats.duplicate_received += 1
            return
        rcpts = ev.get("rcpts") or []
        mail_from = ev.get("mail_from")
        msg = _Message(
            ev["ts"],
            ev.get("forwarded") is True,
            not mail_from,
            len({r.lower() for r in rcpts if isinstance(r, str)}),
        )
        msg.in_window = self._ts_in_window(msg.ts)
        for e in ev["plan"]:
            if e["provider"] not in _PIDX:
                continue  # another route (the DSNs' "bounce"): not compared
            lr = e["rcpt"].lower()
            pair = msg.pairs.get(lr)
            if pair is None:
                pair = msg.pairs[lr] = _Pair(e["rcpt"])
                pilot = e.get("pilot") is True
                g = e.get("group")
                pair.pilot = pilot
                pair.group = g if isinstance(g, str) else (NO_GROUP if pilot else NON_PILOT_GROUP)
                pair.included = msg.in_window and (self.group is None or pair.group == self.group)
            elif e.get("pilot") is True:
                pair.pilot = True
            pair.slots[_PIDX[e["provider"]]] = _Slot(e.get("role") == "primary")
        self.open[key] = msg
        pending = self.orphans.pop(key, None)
        if pending:
            for o in pending:
                self._apply(msg, o)
        if self._is_closed(msg):
            self._close(key, msg)

    def _apply(self, msg: _Message, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        lr = ev["rcpt"].lower()
        pair = msg.pairs.get(lr)
        if kind == "discarded":
            if pair is None:
                pair = msg.pairs[lr] = _Pair(ev["rcpt"])
                pair.included = msg.in_window and self.group is None
            if not pair.discarded:
                pair.discarded = True
                msg.n_discarded += 1
            return
        if pair is None:
            self.stats.unmatched_events += 1
            return
        if kind == "bounce_sent":
            pair.bounce_seen += 1
            if pair.included:
                self.totals.bounces_sent += 1
            return
        if kind == "deleted":
            prov = ev.get("provider")
            slots = pair.slots if prov is None else [pair.slots[_PIDX[prov]]]
            if not any(slots):
                self.stats.unmatched_events += 1
            for sl in slots:
                if sl is not None:
                    self._set_final(sl, _Final(_O_DELETED, ev))
            return
        i = _PIDX[ev["provider"]]
        slot = pair.slots[i]
        if slot is None:
            self.stats.unmatched_events += 1
            return
        outcome = ev["outcome"]
        attempt = _int_or_none(ev.get("attempt"))
        if attempt is not None and attempt > slot.attempts:
            slot.attempts = attempt
        if outcome == "deferred":
            slot.deferrals += 1
            if pair.included:
                r = _RIDX[classify_reason(ev.get("enhanced_code"), ev.get("smtp_response"))]
                for scope in self._scopes(pair):
                    agg = scope.prov[i]
                    agg.deferrals += 1
                    agg.dreasons[r] += 1
            return
        fin = _Final(_FINAL_DELIVERY[outcome], ev)
        old = slot.final
        if old is not None and old.outcome == _O_DELIVERED and fin.outcome == _O_DELIVERED:
            self.stats.duplicate_deliveries += 1
        self._set_final(slot, fin)

    @staticmethod
    def _set_final(slot: _Slot, fin: _Final) -> None:
        old = slot.final
        if old is None or fin.ts < old.ts:  # earliest final event wins
            slot.final = fin

    @staticmethod
    def _is_closed(msg: _Message) -> bool:
        planned = 0
        for pair in msg.pairs.values():
            if pair.discarded:
                continue
            planned += 1
            expect_bounce = 0
            for slot in pair.slots:
                if slot is None:
                    continue
                fin = slot.final
                if fin is None:
                    return False
                if slot.primary and not msg.null_sender and fin.outcome in (_O_BOUNCED, _O_EXPIRED):
                    expect_bounce += 1
            if pair.bounce_seen < expect_bounce:
                return False
        return planned + msg.n_discarded >= msg.n_rcpts

    def _close(self, key: tuple[str, str], msg: _Message) -> None:
        del self.open[key]
        self.closed.append(hash(key))
        self._fold(key, msg)

    def _scopes(self, pair: _Pair) -> list[_Scope]:
        g = self.groups.get(pair.group)
        if g is None:
            g = self.groups[pair.group] = _Scope()
        scopes = [self.overall, g]
        if pair.pilot:
            user = pair.rcpt.lower()
            u = self.users.get(user)
            if u is None:
                u = self.users[user] = _Scope(pair.group)
            scopes.append(u)
        return scopes

    def _fold(self, key: tuple[str, str], msg: _Message) -> None:
        """Fold a finished (or, at the end, still open) message into the counters."""
        any_included = False
        totals = self.totals
        for pair in msg.pairs.values():
            if not pair.included:
                continue
            any_included = True
            totals.pairs += 1
            if pair.forwarded(msg):
                totals.forwarded_pairs += 1
            if pair.discarded and pair.slots == [None, None]:
                totals.discarded_pairs += 1
                if self.sink is not None:
                    self.sink(self._row(key, msg, pair, "", discarded=True))
                continue
            if pair.pilot:
                totals.pilot_pairs += 1
            scopes = self._scopes(pair)
            for scope in scopes:
                scope.pairs += 1
                if pair.pilot:
                    scope.pilot_pairs += 1
            cats: list[int | None] = [None, None]
            for i, slot in enumerate(pair.slots):
                if slot is None:
                    continue
                fin = slot.final
                cat = _O_PENDING if fin is None else fin.outcome
                cats[i] = cat
                reason = -1
                if cat == _O_BOUNCED and fin is not None:
                    reason = _RIDX[classify_reason(fin.enhanced, fin.response)]
                if fin is not None and cat != _O_DELETED:
                    if cat == _O_DELIVERED and fin.latency is not None:
                        self.lat_hist[i][bisect_left(LATENCY_BUCKETS_MS, fin.latency)] += 1
                    hour = self._hour(fin.ts)
                    if hour is not None:
                        hour[i if cat == _O_DELIVERED else 2 + i] += 1
                for scope in scopes:
                    agg = scope.prov[i]
                    agg.planned += 1
                    agg.counts[cat] += 1
                    if cat == _O_DELIVERED and fin is not None:
                        if fin.attempt == 1:
                            agg.first += 1
                        if fin.latency is not None:
                            agg.lat.append(fin.latency)
                    elif reason >= 0:
                        agg.rejections[reason] += 1
            divergence = ""
            if pair.pilot:
                divergence = self._basis(key, msg, pair, cats, scopes[1])
            if self.sink is not None:
                self.sink(self._row(key, msg, pair, divergence, discarded=pair.discarded))
        if any_included:
            totals.messages += 1
            if totals.first_received is None or msg.ts < totals.first_received:
                totals.first_received = msg.ts
            if totals.last_received is None or msg.ts > totals.last_received:
                totals.last_received = msg.ts

    def _basis(
        self,
        key: tuple[str, str],
        msg: _Message,
        pair: _Pair,
        cats: list[int | None],
        group: _Scope,
    ) -> str:
        """Verdict basis and divergences of one pilot pair; returns the divergence label."""
        legacy, new = cats
        if new is None:
            return ""
        forwarded = legacy is None
        if forwarded:
            new_slot = pair.slots[1]
            if not msg.forwarded or new_slot is None or new_slot.primary:
                return ""  # new-only (cut over): nothing to compare with
            legacy = _O_DELIVERED  # the legacy provider has it: it forwarded the copy
        group.b_pairs += 1
        if legacy == _O_PENDING or new == _O_PENDING:
            group.b_pending += 1
            return ""
        group.b_decided += 1
        if legacy == _O_DELIVERED:
            group.b_legacy_delivered += 1
        if new == _O_DELIVERED:
            group.b_new_delivered += 1
        if forwarded:
            return ""
        refused = (_O_BOUNCED, _O_EXPIRED)
        if legacy == _O_DELIVERED and new in refused:
            group.div_new += 1
            by = "new"
        elif new == _O_DELIVERED and legacy in refused:
            group.div_legacy += 1
            by = "legacy"
        else:
            return ""
        self.divergences.append(
            Divergence(
                node=key[0],
                queue_id=key[1],
                received=msg.ts,
                rcpt=pair.rcpt,
                group=pair.group,
                refused_by=by,
                legacy=_outcome(pair.slots[0]),
                new=_outcome(pair.slots[1]),
            )
        )
        return f"{by} refused"

    @staticmethod
    def _row(
        key: tuple[str, str], msg: _Message, pair: _Pair, divergence: str, *, discarded: bool
    ) -> PairRow:
        return PairRow(
            node=key[0],
            queue_id=key[1],
            received=msg.ts,
            rcpt=pair.rcpt,
            group=pair.group if pair.slots != [None, None] else "",
            pilot=pair.pilot,
            forwarded=pair.forwarded(msg),
            discarded=discarded,
            legacy=_outcome(pair.slots[0]),
            new=_outcome(pair.slots[1]),
            divergence=divergence,
        )

    # -- end of input

    def finish(self, thresholds: Thresholds, filters: dict[str, str | None]) -> Report:
        for key, msg in list(self.open.items()):
            self._fold(key, msg)
        self.stats.open_messages = len(self.open)
        self.open.clear()
        if self.orphans:
            hashes = {hash(k): k for k in self.orphans}
            late: set[tuple[str, str]] = set()
            for h in self.closed:
                k = hashes.get(h)
                if k is not None:
                    late.add(k)
            for k, evs in self.orphans.items():
                if k not in late:
                    self.stats.orphan_events += len(evs)
                    continue
                for ev in evs:  # after its message closed: a crash duplicate, or ignored
                    if ev["event"] == "delivery" and ev["outcome"] == "delivered":
                        self.stats.duplicate_deliveries += 1
                    else:
                        self.stats.late_events += 1
            self.orphans.clear()
        self.closed = array("q")

        providers = _provider_stats(self.overall)
        group_stats: list[ScopeStats] = []
        verdicts: list[Verdict] = []
        pilot_first = sorted(
            self.groups.items(),
            key=lambda kv: (kv[1].pilot_pairs == 0, kv[0].startswith("("), kv[0]),
        )
        for name, scope in pilot_first:
            st = ScopeStats(name, scope.pairs, scope.pilot_pairs, _provider_stats(scope))
            group_stats.append(st)
            if scope.pilot_pairs:
                verdicts.append(_verdict(name, scope, st, thresholds))
        users = [
            ScopeStats(u, s.pairs, s.pilot_pairs, _provider_stats(s), group=s.group)
            for u, s in sorted(self.users.items(), key=lambda kv: (kv[1].group or "", kv[0]))
        ]
        self.divergences.sort(key=lambda d: (d.received, d.node, d.queue_id, d.rcpt))
        return Report(
            inputs=self.stats,
            filters=filters,
            thresholds=thresholds,
            totals=self.totals,
            providers=providers,
            groups=group_stats,
            users=users,
            divergences=self.divergences,
            verdicts=verdicts,
            latency_histogram=dict(zip(PROVIDERS, self.lat_hist, strict=True)),
            hourly=[
                HourCounts(
                    hour=f"{k}:00:00Z",
                    delivered=dict(zip(PROVIDERS, c[0:2], strict=True)),
                    refused=dict(zip(PROVIDERS, c[2:4], strict=True)),
                    relay_rejections=c[4],
                )
                for k, c in sorted(self.hours.items())
            ],
        )


def _outcome(slot: _Slot | None) -> Outcome:
    if slot is None:
        return Outcome("")
    fin = slot.final
    if fin is None:
        return Outcome(
            OUTCOMES[_O_PENDING], attempt=slot.attempts or None, deferrals=slot.deferrals
        )
    reason = None
    if fin.outcome in (_O_BOUNCED, _O_EXPIRED):
        reason = classify_reason(fin.enhanced, fin.response)
    return Outcome(
        OUTCOMES[fin.outcome],
        smtp_code=fin.code,
        enhanced_code=fin.enhanced,
        smtp_response=fin.response,
        latency_ms=fin.latency,
        attempt=fin.attempt,
        deferrals=slot.deferrals,
        reason=reason,
    )


def nearest_rank(sorted_values: Sequence[float], p: int) -> float | None:
    """Nearest-rank percentile: the value at rank ceil(p/100*n) (1-based) of sorted values."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))
    return sorted_values[rank - 1]


def _latency(values: array[float]) -> Latency:
    if not values:
        return Latency()
    s = sorted(values)
    p50, p95 = nearest_rank(s, 50), nearest_rank(s, 95)
    return Latency(
        count=len(s),
        p50=None if p50 is None else _num(p50),
        p95=None if p95 is None else _num(p95),
        max=_num(s[-1]),
    )


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _provider_stats(scope: _Scope) -> dict[str, ProviderStats]:
    out: dict[str, ProviderStats] = {}
    for name, agg in zip(PROVIDERS, scope.prov, strict=True):
        c = agg.counts
        out[name] = ProviderStats(
            planned=agg.planned,
            delivered=c[_O_DELIVERED],
            bounced=c[_O_BOUNCED],
            expired=c[_O_EXPIRED],
            deleted=c[_O_DELETED],
            pending=c[_O_PENDING],
            deferrals=agg.deferrals,
            delivery_rate=_ratio(c[_O_DELIVERED], agg.planned),
            first_attempt_success=_ratio(agg.first, agg.planned),
            latency_ms=_latency(agg.lat),
            rejections=dict(zip(REASONS, agg.rejections, strict=True)),
            deferral_reasons=dict(zip(REASONS, agg.dreasons, strict=True)),
        )
    return out


def _pct(ratio: float) -> str:
    v = round(ratio * 100, 1)
    return f"{v:g} %"


def _verdict(name: str, scope: _Scope, st: ScopeStats, t: Thresholds) -> Verdict:
    compared = scope.b_decided
    leg_p95 = st.providers["legacy"].latency_ms.p95
    new_p95 = st.providers["new"].latency_ms.p95
    increase = None if leg_p95 is None or new_p95 is None else _num(new_p95 - leg_p95)
    ratio = (
        round(scope.b_new_delivered / scope.b_legacy_delivered, 4)
        if scope.b_legacy_delivered
        else None
    )
    pending_ratio = _ratio(scope.b_pending, scope.b_pairs)
    v = Verdict(
        group=name,
        verdict=VERDICT_READY,
        reason="",
        compared_pairs=compared,
        legacy_delivered=scope.b_legacy_delivered,
        new_delivered=scope.b_new_delivered,
        delivery_ratio=ratio,
        legacy_p95_ms=leg_p95,
        new_p95_ms=new_p95,
        p95_increase_ms=increase,
        divergences=scope.div_new,
        divergences_legacy_refused=scope.div_legacy,
        pending_pairs=scope.b_pending,
        pending_ratio=pending_ratio,
    )
    if compared < t.min_pairs:
        v.verdict = VERDICT_INSUFFICIENT
        v.reason = (
            f"{compared} compared pair{'s' if compared != 1 else ''} "
            f"(minimum {t.min_pairs}) → {VERDICT_INSUFFICIENT}"
        )
        return v
    parts: list[str] = []
    failed = False
    if ratio is None:
        parts.append("legacy delivered nothing")
    else:
        s = f"new delivered {_pct(ratio)} of what legacy delivered"
        if ratio < t.min_delivery_ratio:
            failed = True
            s += f" (minimum {_pct(t.min_delivery_ratio)})"
        parts.append(s)
    if increase is None:
        parts.append("p95 n/a")
    else:
        s = f"p95 {increase:+,.0f} ms"
        if increase > t.max_p95_increase_ms:
            failed = True
            s += f" (maximum +{t.max_p95_increase_ms:,.0f} ms)"
        parts.append(s)
    s = f"{scope.div_new} divergence{'s' if scope.div_new != 1 else ''}"
    if scope.div_new > t.max_divergences:
        failed = True
        s += f" (maximum {t.max_divergences})"
    if scope.div_legacy:
        s += f" (+{scope.div_legacy} refused by legacy only)"
    parts.append(s)
    if pending_ratio is not None and pending_ratio > t.max_pending_ratio:
        failed = True
        parts.append(f"{_pct(pending_ratio)} pending (maximum {_pct(t.max_pending_ratio)})")
    if failed:
        v.verdict = VERDICT_NOT_READY
    v.reason = ", ".join(parts) + f" → {v.verdict}"
    return v


# --------------------------------------------------------------------------- public API


def _bound(value: str | datetime | date | None, end: bool) -> datetime | None:
    return None if value is None else parse_bound(value, end=end)


def _filter_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_report(
    paths: Iterable[str | os.PathLike[str]],
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    group: str | None = None,
    thresholds: Thresholds | None = None,
    *,
    pair_sink: PairSink | None = None,
) -> Report:
    """The comparison report of the given delivery logs.

    `since`/`until` filter on the message's `received` time (since inclusive,
    until exclusive; a plain date for `until` means the end of that day).
    `pair_sink`, if given, receives each (message, recipient) pair when its
    message closes, or at the end for messages still open (used for CSV).
    Raises ReportError for a missing input, ValueError for a bad time bound.
    """
    plist = [os.fspath(p) for p in paths]
    check_inputs(plist)
    since_t, until_t = _bound(since, False), _bound(until, True)
    b = _Builder(since_t, until_t, group, pair_sink)
    for p in order_inputs(plist):
        b.read(p)
    filters = {"since": _filter_text(since_t), "until": _filter_text(until_t), "group": group}
    return b.finish(thresholds or Thresholds(), filters)


def write_csv(
    paths: Iterable[str | os.PathLike[str]],
    out: TextIO,
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    group: str | None = None,
) -> Report:
    """Stream one CSV row per (message, recipient) pair to `out`; returns the report too."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    return build_report(
        paths, since, until, group, pair_sink=lambda row: w.writerow(_csv_values(row))
    )


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


def render_html(report: Report) -> str:
    """One self-contained HTML page: the text report's content plus SVG charts."""
    from relay.report_html import render_html as render

    return render(report)


# --------------------------------------------------------------------------- text


def _fmt_int(v: int) -> str:
    return f"{v:,}"


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


TEXT_WIDTH = 100


def _wrap(text: str, indent: str = "", first: str | None = None) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text,
        width=TEXT_WIDTH,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first or indent]


def reply_text(o: Outcome) -> str:
    """Code, enhanced code and reply text, without repeating what the reply starts with."""
    resp = o.smtp_response or ""
    head: list[str] = []
    if o.smtp_code is not None and not resp.startswith(str(o.smtp_code)):
        head.append(str(o.smtp_code))
        if o.enhanced_code and not resp.startswith(o.enhanced_code):
            head.append(o.enhanced_code)
    return " ".join([*head, resp]).strip() or "-"


def render_text(report: Report) -> str:
    """Plain-text report: aligned tables readable at 100 columns, no colour."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def table(title: str, cols: Sequence[str], left: int = 1) -> Table:
        t = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1, 0, 0),
            pad_edge=False,
            show_edge=False,
        )
        for i, c in enumerate(cols):
            if i < left:
                t.add_column(c, justify="left", overflow="fold", min_width=8)
            else:
                t.add_column(c, justify="right", no_wrap=True)
        return t

    def rendered(t: Table) -> list[str]:
        buf = io.StringIO()
        con = Console(
            file=buf,
            width=TEXT_WIDTH,
            no_color=True,
            color_system=None,
            force_terminal=False,
            emoji=False,
            highlight=False,
        )
        con.print(t)
        return [*buf.getvalue().splitlines(), ""]

    def row(t: Table, *cells: str) -> None:
        t.add_row(*(Text(c) for c in cells))

    out: list[str] = []
    inp, tot, flt = report.inputs, report.totals, report.filters
    out.append("relay report")
    out += _wrap(f"logs: {', '.join(inp.files) or '-'}", "  ", "")
    out.append(
        f"filters: since {flt.get('since') or '-'}, until {flt.get('until') or '-'} "
        f"(exclusive), group {flt.get('group') or '-'}"
    )
    out.append(f"received: {tot.first_received or '-'} .. {tot.last_received or '-'}")
    out += _wrap(
        f"messages {tot.messages:,}, pairs {tot.pairs:,} (pilot {tot.pilot_pairs:,}, "
        f"forwarded {tot.forwarded_pairs:,}, discarded {tot.discarded_pairs:,}), "
        f"DSNs sent {tot.bounces_sent:,}, refused at SMTP {tot.relay_rejections:,}",
        "  ",
        "",
    )
    out += _wrap(
        f"lines {inp.lines:,}, events {inp.events:,}, corrupt lines {inp.corrupt_lines:,}, "
        f"orphan events {inp.orphan_events:,}, late events {inp.late_events:,}, "
        f"duplicate deliveries {inp.duplicate_deliveries:,}, "
        f"open messages {inp.open_messages:,}",
        "  ",
        "",
    )
    for err in inp.errors:
        out += _wrap(f"warning: {err}", "  ", "")
    out.append("")

    t = table(
        "Per provider (unit: message × recipient)",
        ("provider", "planned", "delivered", "bounced", "expired", "deleted", "pending",
         "deferrals", "rate", "1st try"),
    )  # fmt: skip
    for p, s in report.providers.items():
        row(
            t,
            p,
            *(_fmt_int(x) for x in (s.planned, s.delivered, s.bounced, s.expired, s.deleted)),
            _fmt_int(s.pending),
            _fmt_int(s.deferrals),
            _fmt_rate(s.delivery_rate),
            _fmt_rate(s.first_attempt_success),
        )
    out += rendered(t)

    t = table("Latency of final deliveries (ms)", ("provider", "count", "p50", "p95", "max"))
    for p, s in report.providers.items():
        lat = s.latency_ms
        row(t, p, _fmt_int(lat.count), _fmt_ms(lat.p50), _fmt_ms(lat.p95), _fmt_ms(lat.max))
    out += rendered(t)

    provs = list(report.providers)
    t = table(
        "Reason classes (bounced pairs; deferred attempts)",
        ("class", *(f"{p} bounced" for p in provs), *(f"{p} deferred" for p in provs)),
    )
    for r, label in REASON_LABELS.items():
        row(
            t,
            label,
            *(_fmt_int(report.providers[p].rejections[r]) for p in provs),
            *(_fmt_int(report.providers[p].deferral_reasons[r]) for p in provs),
        )
    out += rendered(t)

    def scope_rows(sc: ScopeStats) -> list[tuple[bool, str, ProviderStats]]:
        shown = [(p, s) for p, s in sc.providers.items() if s.planned] or list(
            sc.providers.items()
        )[:1]
        return [(i == 0, p, s) for i, (p, s) in enumerate(shown)]

    def scope_tables(kind: str, scopes: list[ScopeStats]) -> None:
        user = kind == "user"
        t = table(
            f"Per {'pilot user' if user else 'group'}: outcomes",
            (kind, "provider", "planned", "delivered", "bounced", "expired", "deleted",
             "pending", "deferrals"),
            left=2,
        )  # fmt: skip
        for sc in scopes:
            for first, p, s in scope_rows(sc):
                row(
                    t,
                    sc.name if first else "",
                    p,
                    *(
                        _fmt_int(x)
                        for x in (s.planned, s.delivered, s.bounced, s.expired, s.deleted,
                                  s.pending, s.deferrals)
                    ),
                )  # fmt: skip
        out.extend(rendered(t))
        lead = (kind, "group") if user else (kind,)
        t = table(
            f"Per {'pilot user' if user else 'group'}: rates and latency (ms)",
            (*lead, "provider", "rate", "1st try", "p50", "p95", "max"),
            left=len(lead) + 1,
        )
        for sc in scopes:
            for first, p, s in scope_rows(sc):
                names = [sc.name, sc.group or ""] if user else [sc.name]
                lat = s.latency_ms
                row(
                    t,
                    *(names if first else ["" for _ in names]),
                    p,
                    _fmt_rate(s.delivery_rate),
                    _fmt_rate(s.first_attempt_success),
                    _fmt_ms(lat.p50),
                    _fmt_ms(lat.p95),
                    _fmt_ms(lat.max),
                )
        out.extend(rendered(t))

    scope_tables("group", report.groups)
    if report.users:
        scope_tables("user", report.users)

    out.append(
        f"Divergences: {len(report.divergences)} "
        "(pilot pairs one provider delivered and the other finally refused)"
    )
    for d in report.divergences:
        out += _wrap(
            f"{d.received} {d.node} {d.queue_id} {d.rcpt} [{d.group}] refused by {d.refused_by}",
            "    ",
            "  ",
        )
        for p, o in (("legacy", d.legacy), ("new", d.new)):
            why = f" ({REASON_LABELS[o.reason]})" if o.reason else ""
            out += _wrap(f"{p:<6} {o.outcome}{why}: {reply_text(o)}", "        ", "    ")
    out.append("")

    out.append("Readiness (pilot groups)")
    if not report.verdicts:
        out.append("  no pilot groups")
    for v in report.verdicts:
        out += _wrap(f"{v.group}: {v.verdict.upper()} — {v.reason}", "    ", "  ")
    th = report.thresholds
    out += _wrap(
        f"thresholds: min_pairs {th.min_pairs}, min_delivery_ratio {th.min_delivery_ratio:g}, "
        f"max_p95_increase_ms {th.max_p95_increase_ms:g}, max_divergences {th.max_divergences}, "
        f"max_pending_ratio {th.max_pending_ratio:g}",
        "  ",
        "",
    )
    return "\n".join(line.rstrip() for line in out) + "\n"


# --------------------------------------------------------------------------- command


def _bound_param(end: bool) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse_bound(value, end=end)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return convert


@click.command("report")
@click.argument("logs", metavar="LOG...", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv", "html"]),
    default="text",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--since",
    metavar="T",
    callback=_bound_param(False),
    help="Messages received at/after T (RFC 3339/date).",
)
@click.option(
    "--until",
    metavar="T",
    callback=_bound_param(True),
    help="Messages received before T (exclusive; a date means the end of that day).",
)
@click.option("--group", metavar="G", help="Only pairs of this group.")
@click.option(
    "--thresholds",
    "thresholds_path",
    metavar="FILE",
    help="YAML file overriding readiness thresholds.",
)
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
def report_command(
    logs: tuple[str, ...],
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    group: str | None,
    thresholds_path: str | None,
    output: str | None,
) -> None:
    """Comparison report (legacy vs new) from one or many delivery logs (.gz, rotated)."""
    ctx = click.get_current_context()
    try:
        check_inputs(logs)
        thresholds = load_thresholds(thresholds_path) if thresholds_path else Thresholds()
    except ReportError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(2)
    try:
        if fmt == "csv":
            with _output(output) as out:
                rep = write_csv(logs, out, since, until, group)
            if rep.inputs.corrupt_lines or rep.inputs.orphan_events:
                click.echo(
                    f"relay report: {rep.inputs.corrupt_lines} corrupt lines, "
                    f"{rep.inputs.orphan_events} orphan events skipped",
                    err=True,
                )
            for err in rep.inputs.errors:
                click.echo(f"warning: {err}", err=True)
            return
        rep = build_report(logs, since, until, group, thresholds)
        render = {"json": render_json, "html": render_html}.get(fmt, render_text)
        text = render(rep)
        with _output(output) as out:
            out.write(text)
    except ReportError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(2)
    except OSError as exc:
        click.echo(f"{exc.filename or output}: {exc.strerror or exc}", err=True)
        ctx.exit(1)


class _output:
    """`-o FILE` (written, newline="" for CSV) or stdout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.f: TextIO | None = None

    def __enter__(self) -> TextIO:
        if self.path is None or self.path == "-":
            return sys.stdout
        self.f = open(self.path, "w", encoding="utf-8", newline="")
        return self.f

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


__all__ = [
    "CSV_COLUMNS",
    "LATENCY_BUCKETS_MS",
    "OUTCOMES",
    "PROVIDERS",
    "REASONS",
    "REASON_LABELS",
    "REASON_RULES",
    "Divergence",
    "HourCounts",
    "InputStats",
    "Latency",
    "Outcome",
    "PairRow",
    "ProviderStats",
    "Report",
    "ReportError",
    "ScopeStats",
    "Thresholds",
    "Totals",
    "Verdict",
    "build_report",
    "classify_reason",
    "load_thresholds",
    "nearest_rank",
    "parse_bound",
    "render_html",
    "render_json",
    "render_text",
    "report_command",
    "write_csv",
]
