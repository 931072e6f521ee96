"""The state of one message and its pairs while the logs are folded (relay/report/logs.py),
and the small conversions from that state to the report's records."""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Container
from datetime import UTC
from typing import Any

from relay.privacy import Pseudonymizer
from relay.report.inputs import (
    parse_ts,
)
from relay.report.model import (
    DIVERGENCE_KINDS,
    J_BOTH,
    J_BOTH_FAILED,
    J_LEGACY_ONLY,
    J_NEW_ONLY,
    LATENCY_BUCKETS_MS,
    NON_PILOT_GROUP,
    O_BOUNCED,
    O_DELIVERED,
    O_EXPIRED,
    O_PENDING,
    OUTCOMES,
    Divergence,
    HourCounts,
    Outcome,
)
from relay.report.reasons import classify_reason

_FINAL_DELIVERY = {"delivered": O_DELIVERED, "bounced": O_BOUNCED, "expired": O_EXPIRED}
_REFUSED = (O_BOUNCED, O_EXPIRED)
_JOINED_BY = {(True, True): J_BOTH, (True, False): J_LEGACY_ONLY, (False, True): J_NEW_ONLY,
              (False, False): J_BOTH_FAILED}  # fmt: skip
_CSV_DIVERGENCE = {"new_refused": "new refused", "legacy_refused": "legacy refused",
                   "cutover_refused": "cut-over refused"}  # fmt: skip
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
    __slots__ = (
        "forwarded", "hashed", "in_window", "n_discarded", "n_rcpts", "null_sender", "pairs", "ts"
    )  # fmt: skip

    def __init__(self, ts: str, forwarded: bool, null_sender: bool, n_rcpts: int) -> None:
        self.ts = ts
        self.forwarded = forwarded
        self.null_sender = null_sender
        self.n_rcpts = n_rcpts
        self.n_discarded = 0
        self.in_window = True
        self.pairs: dict[str, _Pair] = {}
        self.hashed = False  # logged by a node whose log says log_privacy: hash


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


def _divergence_order(d: Divergence) -> tuple[str, str, str, str]:
    return (d.received, d.node, d.queue_id, d.rcpt)


def _histogram(values: array[float]) -> list[int]:
    """Counts per LATENCY_BUCKETS_MS bucket (bounds inclusive), and one above the last."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for v in values:
        counts[bisect_left(LATENCY_BUCKETS_MS, v)] += 1
    return counts


def _hourly(divergences: list[Divergence]) -> list[HourCounts]:
    """Divergences per UTC hour of the refusing reply, by kind, hours in order."""
    hours: dict[str, dict[str, int]] = {}
    for d in divergences:
        ts = d.refusal.ts
        key = None if ts is None else _hour_key(ts)
        if key is not None:
            counts = hours.setdefault(key, dict.fromkeys(DIVERGENCE_KINDS, 0))
            counts[d.kind] += 1
    return [HourCounts(f"{k}:00:00Z", c) for k, c in sorted(hours.items())]


def _outcome(slot: _Slot | None, privacy: Pseudonymizer | None, rcpt: str) -> Outcome:
    """One side of a pair as shown; its reply pseudonymized (after classifying it)."""
    if slot is None:
        return Outcome("")
    fin = slot.final
    if fin is None:
        return Outcome(OUTCOMES[O_PENDING], attempt=slot.attempts or None, deferrals=slot.deferrals)
    reason = None
    if fin.outcome in (O_BOUNCED, O_EXPIRED):
        reason = classify_reason(fin.enhanced, fin.response, fin.by)
    response = fin.response
    if privacy is not None and response:
        response = privacy.text(response, [rcpt.rpartition("@")[0]])
    return Outcome(
        OUTCOMES[fin.outcome],
        ts=fin.ts,
        smtp_code=fin.code,
        enhanced_code=fin.enhanced,
        smtp_response=response,
        latency_ms=fin.latency,
        attempt=fin.attempt,
        deferrals=slot.deferrals,
        reason=reason,
    )


# --------------------------------------------------------------------------- public API
