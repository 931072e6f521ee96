"""Reading delivery logs and folding them into the report's figures (`build_report`).

Logs are read line by line (plain or gzip, detected by magic bytes; several
files and several nodes merge, messages are keyed by (node, queue_id); rotated
files are read oldest first). Only messages still open are held in memory: once
every planned (recipient, provider) delivery of a message has a final outcome
(and the DSN of a primary failure has been logged), the message is folded into
counters and dropped. Events of a message not (yet) received wait as orphans;
those of a message already closed are crash duplicates or late. Latencies of
final deliveries are kept in compact `array("d")` buffers for the percentiles.
Each pilot pair is also judged: its joined class, whether it is compared (and
how), and whether it is a divergence (docs/report.md, "Comparison"). `config`
header events give the provider labels and say whether a node's log is already
pseudonymized. With a `Pseudonymizer`, recipients and replies are hashed where
they are shown, never where they are counted or classified, so the figures of a
pseudonymized report equal the plain one's.
See docs/report.md.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from relay.canary import CANARY_GROUP
from relay.privacy import Pseudonymizer
from relay.records import AUTH_CLASSES
from relay.report.auth import Fairness, auth_class
from relay.report.completeness import Completeness
from relay.report.divergences import group_divergences, reply_pattern
from relay.report.figures import (
    ScopeCounters,
    comparison,
    group_figures,
    provider_stats,
    user_figures,
)
from relay.report.inputs import (
    check_inputs,
    check_tz,
    order_inputs,
    parse_bound,
    parse_ts,
    read_counted,
)
from relay.report.model import (
    J_PENDING,
    JOINED,
    M_CUTOVER,
    M_DUAL,
    M_FORWARDED,
    M_PAUSED,
    NO_GROUP,
    NON_PILOT_GROUP,
    O_BOUNCED,
    O_DELETED,
    O_DELIVERED,
    O_EXPIRED,
    O_PENDING,
    PROVIDER_INDEX,
    PROVIDERS,
    Divergence,
    InputStats,
    PairRow,
    PairSink,
    Report,
    ScopeStats,
    Thresholds,
    Totals,
)
from relay.report.pairs import (
    _CSV_DIVERGENCE,
    _DELIVERY_OUTCOMES,
    _FINAL_DELIVERY,
    _JOINED_BY,
    _REFUSED,
    _divergence_order,
    _Final,
    _histogram,
    _hourly,
    _int_or_none,
    _is_one_of,
    _Message,
    _outcome,
    _Pair,
    _Slot,
)
from relay.report.reasons import REASON_INDEX, classify_reason

# --------------------------------------------------------------------------- builder


class _Builder:
    def __init__(
        self,
        since: datetime | None,
        until: datetime | None,
        group: str | None,
        sink: PairSink | None,
        pseudonymizer: Pseudonymizer | None,
        placement: Iterable[str] = (),
    ) -> None:
        self.since = since
        self.until = until
        self.group = group
        self.sink = sink
        self.pseudonymizer = pseudonymizer
        self.hashed_nodes: set[str] = set()  # nodes whose log says log_privacy: hash
        self.by_auth: dict[str, ScopeCounters] = {}
        self.fairness = Fairness(placement)
        self.labels: dict[str, tuple[str, str]] = {}  # provider -> (ts, label) of the latest
        self.open: dict[tuple[str, str], _Message] = {}
        self.orphans: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.closed = array("q")  # hash((node, queue_id)) of closed messages
        self.overall = ScopeCounters()
        self.groups: dict[str, ScopeCounters] = {}
        self.users: dict[str, ScopeCounters] = {}
        # each divergence with the pattern of its reply as logged (for grouping)
        self.divergences: list[tuple[Divergence, str]] = []
        self.totals = Totals()
        self.stats = InputStats(files=[])
        self.completeness = Completeness()  # replays count there and nowhere else

    def _privacy(self, msg: _Message) -> Pseudonymizer | None:
        """The pseudonymizer for a message's data (none if its node's log hashed them)."""
        return None if msg.hashed else self.pseudonymizer

    # -- reading

    def read(self, path: str) -> None:
        read_counted(path, self.stats, self._event)

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
            return True
        if kind == "config":
            self.stats.events += 1
            self._config(node, ts, ev)
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

    def _config(self, node: str, ts: str, ev: dict[str, Any]) -> None:
        """A log's header: provider labels (the latest wins) and the node's log privacy."""
        if ev.get("log_privacy") == "hash":
            self.hashed_nodes.add(node)
        else:
            self.hashed_nodes.discard(node)
        providers = ev.get("providers")
        if not isinstance(providers, dict):
            return
        for name, conf in providers.items():
            label = conf.get("label") if isinstance(conf, dict) else None
            if name in PROVIDER_INDEX and isinstance(label, str) and label.strip():
                old = self.labels.get(name)
                if old is None or ts >= old[0]:
                    self.labels[name] = (ts, label.strip())

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
        msg.hashed = key[0] in self.hashed_nodes
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
                wanted = self.group is None or pair.group == self.group
                pair.included = msg.in_window and wanted and pair.group != CANARY_GROUP
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
                for scope in self._scopes(pair, msg):
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

    def _scopes(self, pair: _Pair, msg: _Message) -> list[ScopeCounters]:
        g = self.groups.get(pair.group)
        if g is None:
            g = self.groups[pair.group] = ScopeCounters()
        scopes = [self.overall, g]
        if pair.pilot:
            user = self._shown_rcpt(msg, pair.rcpt).lower()
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

    def _shown_rcpt(self, msg: _Message, rcpt: str) -> str:
        privacy = self._privacy(msg)
        return rcpt if privacy is None else privacy.address(rcpt)

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
                    self.sink(self._row(key, msg, pair, "", "", discarded=True))
                continue
            if pair.pilot:
                totals.pilot_pairs += 1
            scopes = self._scopes(pair, msg)
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
            joined, kind = self._judge(key, msg, pair, cats, scopes) if pair.pilot else ("", "")
            if pair.pilot:
                legacy_has = cats[0] == O_DELIVERED or (
                    pair.forwarded(msg) and pair.slots[1] is not None and not pair.slots[1].primary
                )
                self.completeness.pair(
                    pair.group, (*key, pair.rcpt.lower()), legacy_has, cats[1] == O_DELIVERED
                )
            if self.sink is not None:
                self.sink(self._row(key, msg, pair, kind, joined, discarded=pair.discarded))
        if any_included:
            totals.messages += 1
            if totals.first_received is None or msg.ts < totals.first_received:
                totals.first_received = msg.ts
            if totals.last_received is None or msg.ts > totals.last_received:
                totals.last_received = msg.ts

    def _judge(
        self,
        key: tuple[str, str],
        msg: _Message,
        pair: _Pair,
        cats: list[int | None],
        scopes: list[ScopeCounters],
    ) -> tuple[str, str]:
        """A pilot pair's joined class and divergence kind, counted in each of its scopes."""
        legacy, new = cats
        new_slot = pair.slots[1]
        if legacy is not None and new is not None:
            mode = M_DUAL
        elif legacy is None:
            forwarded = msg.forwarded and new_slot is not None and not new_slot.primary
            mode = M_FORWARDED if forwarded else M_CUTOVER
            if forwarded:
                legacy = O_DELIVERED  # the legacy provider has it: it forwarded the copy
        else:
            mode = M_PAUSED
        pending = legacy == O_PENDING or new == O_PENDING
        l_ok, n_ok = legacy == O_DELIVERED, new == O_DELIVERED
        cls = J_PENDING if pending else _JOINED_BY[(l_ok, n_ok)]
        kind = ""
        if pending:
            pass
        elif mode == M_DUAL and l_ok and new in _REFUSED:
            kind = "new_refused"
        elif mode == M_DUAL and n_ok and legacy in _REFUSED:
            kind = "legacy_refused"
        elif mode == M_CUTOVER and new in _REFUSED:
            kind = "cutover_refused"
        latencies: tuple[float, float] | None = None
        if mode == M_DUAL and l_ok and n_ok:
            fins = [s.final for s in pair.slots if s is not None]
            lats = [f.latency for f in fins if f is not None]
            if len(lats) == 2 and lats[0] is not None and lats[1] is not None:
                latencies = (lats[0], lats[1])
        for sc in scopes:
            sc.joined[mode][cls] += 1
            if mode == M_PAUSED:
                continue
            if pending:
                sc.b_pending += 1
            elif mode == M_CUTOVER:
                sc.b_cutover += 1
            else:
                sc.b_decided += 1
                sc.b_legacy_delivered += l_ok
                sc.b_new_delivered += n_ok
                if latencies is not None:
                    sc.b_lat[0].append(latencies[0])
                    sc.b_lat[1].append(latencies[1])
            if kind:
                sc.div[kind] += 1
        if kind:
            refusing = pair.slots[0 if kind == "legacy_refused" else 1]
            fin = refusing.final if refusing is not None else None
            pattern = "" if fin is None else reply_pattern(fin.code, fin.enhanced, fin.response)
            privacy = self._privacy(msg)
            self.divergences.append(
                (
                    Divergence(
                        node=key[0],
                        queue_id=key[1],
                        received=msg.ts,
                        rcpt=self._shown_rcpt(msg, pair.rcpt),
                        group=pair.group,
                        kind=kind,
                        refused_by="legacy" if kind == "legacy_refused" else "new",
                        legacy=_outcome(pair.slots[0], privacy, pair.rcpt),
                        new=_outcome(pair.slots[1], privacy, pair.rcpt),
                    ),
                    pattern,
                )
            )
        return JOINED[cls], kind

    def _row(
        self,
        key: tuple[str, str],
        msg: _Message,
        pair: _Pair,
        kind: str,
        joined: str,
        *,
        discarded: bool,
    ) -> PairRow:
        privacy = self._privacy(msg)
        return PairRow(
            node=key[0],
            queue_id=key[1],
            received=msg.ts,
            rcpt=self._shown_rcpt(msg, pair.rcpt),
            group=pair.group if pair.slots != [None, None] else "",
            pilot=pair.pilot,
            forwarded=pair.forwarded(msg),
            discarded=discarded,
            legacy=_outcome(pair.slots[0], privacy, pair.rcpt),
            new=_outcome(pair.slots[1], privacy, pair.rcpt),
            divergence=_CSV_DIVERGENCE.get(kind, ""),
            joined=joined,
            auth_class=pair.auth or "",
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

    def finish(
        self,
        thresholds: Thresholds,
        filters: dict[str, str | None],
        labels: dict[str, str] | None,
    ) -> Report:
        for key, msg in list(self.open.items()):
            self._fold(key, msg)
        self.stats.open_messages = len(self.open)
        self.open.clear()
        self._settle_orphans()
        self.stats.errors += self.fairness.errors
        shown = {p: self.labels[p][1] if p in self.labels else p for p in PROVIDERS}
        shown.update(labels or {})
        group_stats, verdicts = group_figures(self.groups, thresholds, shown)
        self.divergences.sort(key=lambda dp: _divergence_order(dp[0]))
        divergences = [d for d, _ in self.divergences]
        return Report(
            inputs=self.stats,
            filters=filters,
            thresholds=thresholds,
            totals=self.totals,
            comparison=comparison(self.overall),
            providers=provider_stats(self.overall),
            groups=group_stats,
            users=user_figures(self.users),
            divergences=divergences,
            divergence_groups=group_divergences(self.divergences),
            verdicts=verdicts,
            labels=shown,
            pseudonymized=self.pseudonymizer is not None,
            latency_histogram={
                p: _histogram(lat) for p, lat in zip(PROVIDERS, self.overall.b_lat, strict=True)
            },
            hourly=_hourly(divergences),
            completeness=self.completeness.result(),
            by_auth=[
                ScopeStats(c, s.pairs, s.pilot_pairs, provider_stats(s))
                for c, s in sorted(self.by_auth.items(), key=lambda kv: AUTH_CLASSES.index(kv[0]))
            ],
            fairness=self.fairness.table(),
        )


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
    pseudonymizer: Pseudonymizer | None = None,
    labels: dict[str, str] | None = None,
    tz: str = "UTC",
) -> Report:
    """The comparison report of the given delivery logs.

    `since`/`until` filter on the message's `received` time (since inclusive,
    until exclusive; a plain date for `until` means the end of that day).
    `pair_sink`, if given, receives each (message, recipient) pair when its
    message closes, or at the end for messages still open (used for CSV).
    `pseudonymizer` hashes recipients and replies in every output; `labels`
    (provider → name) override the logs' `config` labels; `tz` is the zone the
    text and HTML outputs show times in (an IANA name; the JSON stays UTC).
    `placement`: placement logs, for the fairness table (relay/report/auth.py).
    Raises ReportError for a missing input or an unknown zone, ValueError for a
    bad time bound.
    """
    plist = [os.fspath(p) for p in paths]
    check_inputs(plist)
    check_tz(tz)
    since_t, until_t = _bound(since, False), _bound(until, True)
    check_inputs([os.fspath(p) for p in placement])
    b = _Builder(
        since_t, until_t, group, pair_sink, pseudonymizer, [os.fspath(p) for p in placement]
    )
    for p in order_inputs(plist):
        b.read(p)
    filters = {"since": _filter_text(since_t), "until": _filter_text(until_t), "group": group}
    rep = b.finish(thresholds or Thresholds(), filters, labels)
    rep.tz = tz
    return rep
