"""Reading delivery logs and folding them into the report's figures (`build_report`).

Logs are read line by line (plain or gzip, detected by magic bytes; several
files and several nodes merge, messages are keyed by (node, queue_id); rotated
files are read oldest first). Only messages still open are held in memory: once
every planned (recipient, provider) delivery of a message has a final outcome
(and the DSN of a primary failure has been logged), the message is folded into
counters and dropped. Events of a message not (yet) received wait as orphans;
those of a message already closed are crash duplicates or late. Latencies of
final deliveries are kept in compact `array("d")` buffers for the percentiles.
See docs/report.md.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Container, Iterable
from datetime import UTC, date, datetime
from typing import Any

from relay.records import AUTH_CLASSES
from relay.report.auth import Fairness, auth_class
from relay.report.completeness import Completeness
from relay.report.figures import (
    ScopeCounters,
    group_figures,
    provider_stats,
    user_figures,
)
from relay.report.inputs import check_inputs, open_log, order_inputs, parse_bound, parse_ts
from relay.report.model import (
    LATENCY_BUCKETS_MS,
    NO_GROUP,
    NON_PILOT_GROUP,
    O_BOUNCED,
    O_DELETED,
    O_DELIVERED,
    O_EXPIRED,
    O_PENDING,
    OUTCOMES,
    PROVIDER_INDEX,
    PROVIDERS,
    Divergence,
    HourCounts,
    InputStats,
    Outcome,
    PairRow,
    PairSink,
    Report,
    ScopeStats,
    Thresholds,
    Totals,
)
from relay.report.reasons import REASON_INDEX, classify_reason

_FINAL_DELIVERY = {"delivered": O_DELIVERED, "bounced": O_BOUNCED, "expired": O_EXPIRED}
_DELIVERY_OUTCOMES = {"delivered", "deferred", "bounced", "expired"}
_HOUR_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}")


# --------------------------------------------------------------------------- streaming state


class _Final:
    """The final event of one planned delivery."""

    __slots__ = ("attempt", "by", "code", "enhanced", "latency", "outcome", "response", "ts")

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
        self.by = ev.get("by")


class _Slot:
    """One planned (pair, provider) delivery."""

    __slots__ = ("attempts", "deferrals", "final", "primary")

    def __init__(self, primary: bool) -> None:
        self.primary = primary
        self.final: _Final | None = None
        self.deferrals = 0
        self.attempts = 0


class _Pair:
    __slots__ = (
        "auth", "bounce_seen", "discarded", "group", "included", "pilot", "rcpt", "slots",
    )  # fmt: skip

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
        self.auth: str | None = None  # the message's authentication class at ingress


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


def _is_one_of(v: Any, names: Container[str]) -> bool:
    return type(v) is str and v in names


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _hour_key(ts: str) -> str | None:
    """The UTC hour of a timestamp, "YYYY-MM-DDTHH" (None if it does not parse)."""
    if ts.endswith("Z") and _HOUR_RE.match(ts):
        return ts[:13]
    t = parse_ts(ts)
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H")


# --------------------------------------------------------------------------- builder


class _Builder:
    def __init__(
        self,
        since: datetime | None,
        until: datetime | None,
        group: str | None,
        sink: PairSink | None,
        placement: Iterable[str] = (),
    ) -> None:
        self.since = since
        self.until = until
        self.group = group
        self.sink = sink
        self.open: dict[tuple[str, str], _Message] = {}
        self.orphans: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.closed = array("q")  # hash((node, queue_id)) of closed messages
        self.overall = ScopeCounters()
        self.groups: dict[str, ScopeCounters] = {}
        self.users: dict[str, ScopeCounters] = {}
        self.by_auth: dict[str, ScopeCounters] = {}
        self.fairness = Fairness(placement)
        self.divergences: list[Divergence] = []
        self.totals = Totals()
        self.stats = InputStats(files=[])
        # chart data: latency buckets per provider, and per hour key
        # [legacy delivered, new delivered, legacy refused, new refused, relay rejections]
        self.lat_hist = ([0] * (len(LATENCY_BUCKETS_MS) + 1), [0] * (len(LATENCY_BUCKETS_MS) + 1))
        self.hours: dict[str, list[int]] = {}
        self.completeness = Completeness()  # replays count there and nowhere else

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
            with open_log(path) as f:
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
            count = ev.get("count", 1)  # a session's summary event stands for `count` refusals
            if type(count) is not int or count < 1:
                count = 1
            if self.group is None and self._ts_in_window(ts):
                self.totals.relay_rejections += count
                hour = self._hour(ts)
                if hour is not None:
                    hour[4] += count
            return True
        if kind == "archive_purged":
            self.stats.events += 1
            return True
        qid = ev.get("queue_id")
        if type(qid) is not str:
            return False
        key = (node, qid)
        if kind == "replayed" or (kind == "delivery" and ev.get("role") == "replay"):
            self.stats.events += 1
            return self.completeness.event(ev)
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
            if prov is not None and prov not in PROVIDER_INDEX:  # e.g. the DSNs' "bounce" route
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
        t = parse_ts(ts)
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
        cls = auth_class(ev)
        for e in ev["plan"]:
            if e["provider"] not in PROVIDER_INDEX:
                continue  # another route (the DSNs' "bounce"): not compared
            lr = e["rcpt"].lower()
            pair = msg.pairs.get(lr)
            if pair is None:
                pair = msg.pairs[lr] = _Pair(e["rcpt"])
                pilot = e.get("pilot") is True
                g = e.get("group")
                pair.pilot = pilot
                pair.auth = cls
                pair.group = g if isinstance(g, str) else (NO_GROUP if pilot else NON_PILOT_GROUP)
                pair.included = msg.in_window and (self.group is None or pair.group == self.group)
            elif e.get("pilot") is True:
                pair.pilot = True
            pair.slots[PROVIDER_INDEX[e["provider"]]] = _Slot(e.get("role") == "primary")
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
            if ev.get("action") is not None:  # a delay warning or `relayed` DSN: no bounce
                return
            pair.bounce_seen += 1
            if pair.included:
                self.totals.bounces_sent += 1
            return
        if kind == "deleted":
            prov = ev.get("provider")
            slots = pair.slots if prov is None else [pair.slots[PROVIDER_INDEX[prov]]]
            if not any(slots):
                self.stats.unmatched_events += 1
            for sl in slots:
                if sl is not None:
                    self._set_final(sl, _Final(O_DELETED, ev))
            return
        i = PROVIDER_INDEX[ev["provider"]]
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
                by = ev.get("by")
                why = classify_reason(ev.get("enhanced_code"), ev.get("smtp_response"), by)
                r = REASON_INDEX[why]
                for scope in self._scopes(pair):
                    agg = scope.prov[i]
                    agg.deferrals += 1
                    agg.dreasons[r] += 1
            return
        fin = _Final(_FINAL_DELIVERY[outcome], ev)
        old = slot.final
        if old is not None and old.outcome == O_DELIVERED and fin.outcome == O_DELIVERED:
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
                if slot.primary and not msg.null_sender and fin.outcome in (O_BOUNCED, O_EXPIRED):
                    expect_bounce += 1
            if pair.bounce_seen < expect_bounce:
                return False
        return planned + msg.n_discarded >= msg.n_rcpts

    def _close(self, key: tuple[str, str], msg: _Message) -> None:
        del self.open[key]
        self.closed.append(hash(key))
        self._fold(key, msg)

    def _scopes(self, pair: _Pair) -> list[ScopeCounters]:
        g = self.groups.get(pair.group)
        if g is None:
            g = self.groups[pair.group] = ScopeCounters()
        scopes = [self.overall, g]
        if pair.pilot:
            user = pair.rcpt.lower()
            u = self.users.get(user)
            if u is None:
                u = self.users[user] = ScopeCounters(pair.group)
            scopes.append(u)
        if pair.auth is not None:
            a = self.by_auth.get(pair.auth)
            if a is None:
                a = self.by_auth[pair.auth] = ScopeCounters()
            scopes.append(a)
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
            self.fairness.pair(key[0], key[1], pair.rcpt, pair.auth)
            for scope in scopes:
                scope.pairs += 1
                if pair.pilot:
                    scope.pilot_pairs += 1
            cats: list[int | None] = [None, None]
            for i, slot in enumerate(pair.slots):
                if slot is None:
                    continue
                fin = slot.final
                cat = O_PENDING if fin is None else fin.outcome
                cats[i] = cat
                reason = -1
                if cat == O_BOUNCED and fin is not None:
                    reason = REASON_INDEX[classify_reason(fin.enhanced, fin.response, fin.by)]
                if fin is not None and cat != O_DELETED:
                    if cat == O_DELIVERED and fin.latency is not None:
                        self.lat_hist[i][bisect_left(LATENCY_BUCKETS_MS, fin.latency)] += 1
                    hour = self._hour(fin.ts)
                    if hour is not None:
                        hour[i if cat == O_DELIVERED else 2 + i] += 1
                for scope in scopes:
                    agg = scope.prov[i]
                    agg.planned += 1
                    agg.counts[cat] += 1
                    if cat == O_DELIVERED and fin is not None:
                        if fin.attempt == 1:
                            agg.first += 1
                        if fin.latency is not None:
                            agg.lat.append(fin.latency)
                    elif reason >= 0:
                        agg.rejections[reason] += 1
            divergence = ""
            if pair.pilot:
                divergence = self._basis(key, msg, pair, cats, scopes[1])
                legacy_has = cats[0] == O_DELIVERED or (
                    pair.forwarded(msg) and pair.slots[1] is not None and not pair.slots[1].primary
                )
                self.completeness.pair(
                    pair.group, (*key, pair.rcpt.lower()), legacy_has, cats[1] == O_DELIVERED
                )
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
        group: ScopeCounters,
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
            legacy = O_DELIVERED  # the legacy provider has it: it forwarded the copy
        group.b_pairs += 1
        if legacy == O_PENDING or new == O_PENDING:
            group.b_pending += 1
            return ""
        group.b_decided += 1
        if legacy == O_DELIVERED:
            group.b_legacy_delivered += 1
        if new == O_DELIVERED:
            group.b_new_delivered += 1
        if forwarded:
            return ""
        refused = (O_BOUNCED, O_EXPIRED)
        if legacy == O_DELIVERED and new in refused:
            group.div_new += 1
            by = "new"
        elif new == O_DELIVERED and legacy in refused:
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

    def _settle_orphans(self) -> None:
        """Count the events whose message never came: orphans, or (closed before) late."""
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

    def finish(self, thresholds: Thresholds, filters: dict[str, str | None]) -> Report:
        for key, msg in list(self.open.items()):
            self._fold(key, msg)
        self.stats.open_messages = len(self.open)
        self.open.clear()
        self._settle_orphans()
        group_stats, verdicts = group_figures(self.groups, thresholds)
        self.divergences.sort(key=lambda d: (d.received, d.node, d.queue_id, d.rcpt))
        self.stats.errors += self.fairness.errors
        return Report(
            inputs=self.stats,
            filters=filters,
            thresholds=thresholds,
            totals=self.totals,
            providers=provider_stats(self.overall),
            groups=group_stats,
            users=user_figures(self.users),
            divergences=self.divergences,
            verdicts=verdicts,
            completeness=self.completeness.result(),
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
            by_auth=[
                ScopeStats(c, s.pairs, s.pilot_pairs, provider_stats(s))
                for c, s in sorted(self.by_auth.items(), key=lambda kv: AUTH_CLASSES.index(kv[0]))
            ],
            fairness=self.fairness.table(),
        )


def _outcome(slot: _Slot | None) -> Outcome:
    if slot is None:
        return Outcome("")
    fin = slot.final
    if fin is None:
        return Outcome(OUTCOMES[O_PENDING], attempt=slot.attempts or None, deferrals=slot.deferrals)
    reason = None
    if fin.outcome in (O_BOUNCED, O_EXPIRED):
        reason = classify_reason(fin.enhanced, fin.response, fin.by)
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
    placement: Iterable[str | os.PathLike[str]] = (),
) -> Report:
    """The comparison report of the given delivery logs.

    `since`/`until` filter on the message's `received` time (since inclusive,
    until exclusive; a plain date for `until` means the end of that day).
    `pair_sink`, if given, receives each (message, recipient) pair when its
    message closes, or at the end for messages still open (used for CSV).
    `placement`: placement logs, for the fairness table (relay/report/auth.py).
    Raises ReportError for a missing input, ValueError for a bad time bound.
    """
    plist = [os.fspath(p) for p in paths]
    check_inputs(plist)
    since_t, until_t = _bound(since, False), _bound(until, True)
    check_inputs([os.fspath(p) for p in placement])
    b = _Builder(since_t, until_t, group, pair_sink, [os.fspath(p) for p in placement])
    for p in order_inputs(plist):
        b.read(p)
    filters = {"since": _filter_text(since_t), "until": _filter_text(until_t), "group": group}
    return b.finish(thresholds or Thresholds(), filters)
