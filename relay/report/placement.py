"""The report's Placement section, from the probe's placement logs (`--placement LOG...`).

One result per (message, recipient, provider): when a copy was logged more than
once (a probe restarted after a crash), a found folder beats `missing`, which
beats `unknown`, and the earliest of equals wins. Figures per provider, group
and pilot user: probed, inbox, junk, other, missing, unknown and the junk rate
= junk / (probed − unknown). A placement divergence is a pilot pair in one
provider's Inbox and the other's Junk or missing (both sides shown).

Each pilot group's readiness verdict gains two thresholds: `min_probed_pairs`
(pairs with a known result at both providers; fewer → "placement:
insufficient data") and `max_junk_rate_increase` (new's junk rate minus
legacy's over those pairs, on authenticated mail — `auth_class` aligned_pass —
when the placement events carry the relay's verdicts). See docs/report.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from relay.report.canaries import is_canary
from relay.report.format import fmt_pct
from relay.report.inputs import check_inputs, order_inputs, parse_ts, read_counted
from relay.report.model import (
    PROVIDERS,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_READY,
    VERDICT_READY,
    PairRow,
    Report,
    Thresholds,
    Verdict,
)

FOLDERS = ("inbox", "junk", "other", "missing", "unknown")
_RANK = {"inbox": 0, "junk": 0, "other": 0, "missing": 1, "unknown": 2}
AUTHENTICATED = "aligned_pass"
ARROW = " → "


@dataclass
class PlacementStats:
    probed: int = 0
    inbox: int = 0
    junk: int = 0
    other: int = 0
    missing: int = 0
    unknown: int = 0
    junk_rate: float | None = None  # junk / (probed - unknown)

    def add(self, folder: str) -> None:
        self.probed += 1
        setattr(self, folder, getattr(self, folder) + 1)

    def settle(self) -> None:
        known = self.probed - self.unknown
        self.junk_rate = round(self.junk / known, 4) if known else None


@dataclass
class PlacementScope:
    name: str
    providers: dict[str, PlacementStats]
    group: str | None = None  # users: their group


@dataclass
class Side:
    """One provider's result for a pair."""

    folder: str
    detail: str | None = None
    provider_time: str | None = None
    looked_after_s: float | None = None
    verdict: dict[str, Any] | None = None


@dataclass
class PlacementDivergence:
    node: str
    queue_id: str
    received: str | None
    rcpt: str
    group: str
    junked_by: str  # the provider whose copy is in Junk or missing
    legacy: Side
    new: Side


@dataclass
class PlacementVerdict:
    group: str
    probed_pairs: int  # pilot pairs with a known result at both providers (the basis)
    authenticated_only: bool
    legacy_junk_rate: float | None
    new_junk_rate: float | None
    junk_rate_increase: float | None
    verdict: str
    reason: str


@dataclass
class PlacementReport:
    files: list[str]
    lines: int = 0
    events: int = 0
    corrupt_lines: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    providers: dict[str, PlacementStats] = field(default_factory=dict)
    groups: list[PlacementScope] = field(default_factory=list)
    users: list[PlacementScope] = field(default_factory=list)
    divergences: list[PlacementDivergence] = field(default_factory=list)
    verdicts: list[PlacementVerdict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The `placement` key of the JSON report (docs/report.md)."""
        return {
            "inputs": {
                "files": self.files, "lines": self.lines, "events": self.events,
                "corrupt_lines": self.corrupt_lines, "duplicates": self.duplicates,
                "errors": self.errors,
            },
            "providers": {p: asdict(s) for p, s in self.providers.items()},
            "groups": [_scope_dict(s, "group") for s in self.groups],
            "users": [_scope_dict(s, "user") for s in self.users],
            "divergences": [asdict(d) for d in self.divergences],
            "verdicts": [asdict(v) for v in self.verdicts],
        }  # fmt: skip


def _scope_dict(s: PlacementScope, kind: str) -> dict[str, Any]:
    d: dict[str, Any] = {kind: s.name}
    if kind == "user":
        d["group"] = s.group
    d["providers"] = {p: asdict(ps) for p, ps in s.providers.items()}
    return d


class _Pair:
    __slots__ = ("auth_class", "group", "node", "queue_id", "rcpt", "received", "sides")

    def __init__(self, ev: dict[str, Any]) -> None:
        self.node: str = ev["node"]
        self.queue_id: str = ev["queue_id"]
        self.rcpt: str = ev["rcpt"]
        g = ev.get("group")
        self.group: str = g if isinstance(g, str) else "(none)"
        r = ev.get("received")
        self.received: str | None = r if isinstance(r, str) else None
        a = ev.get("auth_class")
        self.auth_class: str | None = a if isinstance(a, str) else None
        self.sides: dict[str, tuple[str, Side]] = {}  # provider -> (ts, side)


def _valid(ev: Any) -> bool:
    return (
        isinstance(ev, dict)
        and ev.get("event") == "placement"
        and all(isinstance(ev.get(k), str) for k in ("ts", "node", "queue_id", "rcpt"))
        and ev.get("provider") in PROVIDERS
        and ev.get("folder") in FOLDERS
    )


def _side(ev: dict[str, Any]) -> Side:
    def text(key: str) -> str | None:
        v = ev.get(key)
        return v if isinstance(v, str) else None

    after = ev.get("looked_after_s")
    verdict = ev.get("verdict")
    return Side(
        folder=ev["folder"],
        detail=text("detail"),
        provider_time=text("provider_time"),
        looked_after_s=after if isinstance(after, (int, float)) else None,
        verdict=verdict if isinstance(verdict, dict) else None,
    )


class _Reader:
    def __init__(self, since: datetime | None, until: datetime | None, group: str | None):
        self.since, self.until, self.group = since, until, group
        self.pairs: dict[tuple[str, str, str], _Pair] = {}
        self.out = PlacementReport(files=[])

    def read(self, path: str) -> None:
        read_counted(path, self.out, self._line)

    def _line(self, ev: dict[str, Any]) -> bool:
        """A placement event is counted and folded; another event kind is no error."""
        if _valid(ev):
            self.out.events += 1
            self._event(ev)
            return True
        return ev.get("event") != "placement"

    def _in_window(self, ev: dict[str, Any]) -> bool:
        if is_canary(ev):  # the Canaries section's (relay/report/canaries.py)
            return False
        if self.group is not None and ev.get("group") != self.group:
            return False
        if self.since is None and self.until is None:
            return True
        r = ev.get("received")
        t = parse_ts(r) if isinstance(r, str) else None
        if t is None:
            return False
        return not (
            (self.since is not None and t < self.since)
            or (self.until is not None and t >= self.until)
        )

    def _event(self, ev: dict[str, Any]) -> None:
        if not self._in_window(ev):
            return
        key = (ev["node"], ev["queue_id"], ev["rcpt"].lower())
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = _Pair(ev)
        prov, side = ev["provider"], _side(ev)
        old = pair.sides.get(prov)
        if old is not None:
            self.out.duplicates += 1
            rank_old, rank_new = _RANK[old[1].folder], _RANK[side.folder]
            if (rank_old, old[0]) <= (rank_new, ev["ts"]):
                return
        pair.sides[prov] = (ev["ts"], side)


def read_placement(
    paths: Iterable[str | os.PathLike[str]],
    since: datetime | None = None,
    until: datetime | None = None,
    group: str | None = None,
) -> tuple[PlacementReport, dict[tuple[str, str, str], _Pair]]:
    plist = [os.fspath(p) for p in paths]
    check_inputs(plist)
    r = _Reader(since, until, group)
    for p in order_inputs(plist):
        r.read(p)
    return r.out, r.pairs


def _stats() -> dict[str, PlacementStats]:
    return {p: PlacementStats() for p in PROVIDERS}


def placement_figures(
    paths: Iterable[str | os.PathLike[str]],
    thresholds: Thresholds,
    since: datetime | None = None,
    until: datetime | None = None,
    group: str | None = None,
) -> PlacementReport:
    """The Placement section of the given placement logs (filters as the report's)."""
    out, pairs = read_placement(paths, since, until, group)
    groups: dict[str, dict[str, PlacementStats]] = {}
    users: dict[str, tuple[str, dict[str, PlacementStats]]] = {}
    overall = _stats()
    basis: dict[str, list[_Pair]] = {}
    for pair in sorted(
        pairs.values(), key=lambda p: (p.received or "", p.node, p.queue_id, p.rcpt)
    ):
        g = groups.setdefault(pair.group, _stats())
        u = users.setdefault(pair.rcpt.lower(), (pair.group, _stats()))[1]
        for prov, (_, side) in pair.sides.items():
            for scope in (overall, g, u):
                scope[prov].add(side.folder)
        sides = {p: s for p, (_, s) in pair.sides.items()}
        if len(sides) == 2:
            basis.setdefault(pair.group, []).append(pair)
            div = _divergence(pair, sides["legacy"], sides["new"])
            if div is not None:
                out.divergences.append(div)
    for scope in (overall, *groups.values(), *(s for _, s in users.values())):
        for s in scope.values():
            s.settle()
    out.providers = overall
    out.groups = [PlacementScope(n, s) for n, s in sorted(groups.items(), key=_group_order)]
    out.users = [
        PlacementScope(u, s, group=g)
        for u, (g, s) in sorted(users.items(), key=lambda kv: (kv[1][0], kv[0]))
    ]
    out.verdicts = [
        _verdict(name, basis.get(name, []), thresholds)
        for name, _ in sorted(groups.items(), key=_group_order)
    ]
    return out


def _group_order(kv: tuple[str, Any]) -> tuple[bool, str]:
    return (kv[0].startswith("("), kv[0])


def junked_by(legacy: str, new: str) -> str | None:
    """The provider that junked (or lost) a copy the other put in the Inbox, if one did."""
    bad = ("junk", "missing")
    if legacy == "inbox" and new in bad:
        return "new"
    if new == "inbox" and legacy in bad:
        return "legacy"
    return None


def _divergence(pair: _Pair, legacy: Side, new: Side) -> PlacementDivergence | None:
    by = junked_by(legacy.folder, new.folder)
    if by is None:
        return None
    return PlacementDivergence(
        pair.node, pair.queue_id, pair.received, pair.rcpt, pair.group, by, legacy, new
    )


def _verdict(name: str, pairs: list[_Pair], t: Thresholds) -> PlacementVerdict:
    known = [p for p in pairs if all(s.folder != "unknown" for _, s in p.sides.values())]
    authenticated = any(p.auth_class for p in known)
    if authenticated:
        known = [p for p in known if p.auth_class == AUTHENTICATED]
    n = len(known)

    def rate(prov: str) -> float | None:
        return (
            round(sum(1 for p in known if p.sides[prov][1].folder == "junk") / n, 4) if n else None
        )

    leg, new = rate("legacy"), rate("new")
    increase = None if leg is None or new is None else round(new - leg, 4)
    basis = "authenticated " if authenticated else ""
    v = PlacementVerdict(name, n, authenticated, leg, new, increase, VERDICT_READY, "")
    if n < t.min_probed_pairs:
        v.verdict = VERDICT_INSUFFICIENT
        v.reason = (
            f"placement: insufficient data ({n} probed {basis}pair{'s' if n != 1 else ''}, "
            f"minimum {t.min_probed_pairs})"
        )
        return v
    assert leg is not None and new is not None and increase is not None
    v.reason = (
        f"placement: new junked {fmt_pct(new)} of {n} probed {basis}pairs, legacy {fmt_pct(leg)} "
        f"({increase * 100:+.1f} points"
    )
    if increase > t.max_junk_rate_increase:
        v.verdict = VERDICT_NOT_READY
        v.reason += f", maximum +{t.max_junk_rate_increase * 100:g}"
    v.reason += ")"
    return v


def _combine(v: Verdict, pv: PlacementVerdict) -> None:
    """Add the placement finding to a group's readiness verdict (the worse verdict wins)."""
    head, _, _ = v.reason.rpartition(ARROW)
    order = (VERDICT_READY, VERDICT_INSUFFICIENT, VERDICT_NOT_READY)
    if order.index(pv.verdict) > order.index(v.verdict):
        v.verdict = pv.verdict
    v.reason = f"{head or v.reason}, {pv.reason}{ARROW}{v.verdict}"


def attach_placement(
    report: Report,
    paths: Iterable[str | os.PathLike[str]],
    since: datetime | None = None,
    until: datetime | None = None,
    group: str | None = None,
) -> Report:
    """Add the Placement section to `report` and fold it into each pilot group's verdict."""
    report.placement = placement_figures(paths, report.thresholds, since, until, group)
    by_group = {pv.group: pv for pv in report.placement.verdicts}
    for v in report.verdicts:
        pv = by_group.get(v.group)
        _combine(v, pv if pv is not None else _verdict(v.group, [], report.thresholds))
    return report


CSV_COLUMNS = ("legacy_folder", "new_folder", "placement_divergence")


def placement_columns(
    paths: Iterable[str | os.PathLike[str]],
    since: datetime | None,
    until: datetime | None,
    group: str | None,
) -> tuple[tuple[str, ...], Callable[[PairRow], list[Any]]]:
    """The CSV's extra columns and, per pair row, their values (folder per provider)."""
    _, pairs = read_placement(paths, since, until, group)

    def values(row: PairRow) -> list[Any]:
        pair = pairs.get((row.node, row.queue_id, row.rcpt.lower()))
        if pair is None:
            return ["", "", ""]
        folders = {p: s.folder for p, (_, s) in pair.sides.items()}
        by = junked_by(folders["legacy"], folders["new"]) if len(folders) == 2 else None
        return [folders.get("legacy", ""), folders.get("new", ""), f"junked by {by}" if by else ""]

    return CSV_COLUMNS, values
