"""The report's Canaries section: per provider, canaries sent (the delivery logs'
`(canary)` plan entries), arrived, where they were filed and how long they took
(INTERNALDATE minus the relay's 250, from the probe's placement logs). Canary
pairs are in no pilot figure or verdict (relay/report/logs.py, placement.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from relay.canary import CANARY_GROUP
from relay.report.inputs import parse_ts, read_events
from relay.report.model import PROVIDERS

FOUND = ("inbox", "junk", "other")


@dataclass
class CanaryStats:
    sent: int = 0
    arrived: int = 0
    inbox: int = 0
    junk: int = 0
    other: int = 0
    missing: int = 0  # sent, not found (yet, or ever: the probe's `missing` and `unknown`)
    arrival_p50_s: float | None = None
    arrival_p95_s: float | None = None
    arrival_max_s: float | None = None


@dataclass
class CanaryReport:
    providers: dict[str, CanaryStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {p: asdict(s) for p, s in self.providers.items()}


def is_canary(ev: dict[str, Any]) -> bool:
    return ev.get("canary") is True or ev.get("group") == CANARY_GROUP


def _within(ts: Any, since: datetime | None, until: datetime | None) -> bool:
    t = parse_ts(ts) if isinstance(ts, str) else None
    return t is not None and not (
        (since is not None and t < since) or (until is not None and t >= until)
    )


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def canary_report(
    logs: Iterable[str],
    placement: Iterable[str],
    since: datetime | None = None,
    until: datetime | None = None,
) -> CanaryReport | None:
    """The section's figures; None when the logs hold no canary."""
    stats = {p: CanaryStats() for p in PROVIDERS}
    sent: set[tuple[str, str, str, str]] = set()
    for ev in read_events(logs):
        if ev.get("event") != "received" or not _within(ev.get("ts"), since, until):
            continue
        for e in ev.get("plan") or []:
            if isinstance(e, dict) and is_canary(e) and e.get("provider") in stats:
                sent.add((ev.get("node", ""), ev.get("queue_id", ""), e["rcpt"], e["provider"]))
    if not sent:
        return None
    found: dict[tuple[str, str, str, str], tuple[str, float | None]] = {}
    for ev in read_events(placement):
        key = (ev.get("node"), ev.get("queue_id"), ev.get("rcpt"), ev.get("provider"))
        if ev.get("event") != "placement" or not is_canary(ev) or key not in sent:
            continue
        folder = ev.get("folder")
        if folder in FOUND and key not in found:
            found[key] = (folder, _arrival(ev))
    arrivals: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for key in sent:
        s = stats[key[3]]
        s.sent += 1
        if key not in found:
            s.missing += 1
            continue
        folder, arrival = found[key]
        s.arrived += 1
        setattr(s, folder, getattr(s, folder) + 1)
        if arrival is not None:
            arrivals[key[3]].append(arrival)
    for p, values in arrivals.items():
        if values:
            values.sort()
            s = stats[p]
            s.arrival_p50_s, s.arrival_p95_s = _quantile(values, 0.5), _quantile(values, 0.95)
            s.arrival_max_s = values[-1]
    return CanaryReport(stats)


def _arrival(ev: dict[str, Any]) -> float | None:
    """INTERNALDATE minus the 250: the look's time less how long after the 250 it was."""
    arrived, looked = parse_ts(ev.get("provider_time") or ""), parse_ts(ev.get("ts") or "")
    after = ev.get("looked_after_s")
    if arrived is None or looked is None or not isinstance(after, int | float):
        return None
    return round(arrived.timestamp() - (looked.timestamp() - after), 3)


def canaries_text(canaries: CanaryReport | None) -> list[str]:
    """The text report's Canaries section (nothing without canaries)."""
    if canaries is None:
        return []

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:g} s"

    out = ["Canaries (messages the relay sent itself; in no pilot figure)"]
    out.append("  provider  sent  arrived  inbox  junk  other  missing  arrival p50 / p95 / max")
    for p, s in canaries.providers.items():
        times = " / ".join(sec(v) for v in (s.arrival_p50_s, s.arrival_p95_s, s.arrival_max_s))
        out.append(
            f"  {p:<8}  {s.sent:>4}  {s.arrived:>7}  {s.inbox:>5}  {s.junk:>4}  {s.other:>5}"
            f"  {s.missing:>7}  {times}"
        )
    out.append("")
    return out
