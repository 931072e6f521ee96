"""The report's figures: counters folded from the logs, then rates, percentiles, verdicts.

relay.report.logs fills one `ScopeCounters` for the whole log, one per group and
one per pilot user; this module turns them into `ProviderStats`, `ScopeStats`
and each pilot group's `Verdict` against the readiness `Thresholds`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from relay.report.format import fmt_pct, num
from relay.report.model import (
    O_BOUNCED,
    O_DELETED,
    O_DELIVERED,
    O_EXPIRED,
    O_PENDING,
    PROVIDERS,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_READY,
    VERDICT_READY,
    Latency,
    ProviderStats,
    ReportError,
    ScopeStats,
    Thresholds,
    Verdict,
)
from relay.report.reasons import REASONS


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


class ProviderCounters:
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


class ScopeCounters:
    """Counters of one scope (the whole log, a group, a pilot user) and its verdict basis."""

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
        self.prov = (ProviderCounters(), ProviderCounters())
        # verdict basis: pilot pairs with a new delivery and a legacy one (or forwarded)
        self.b_pairs = 0
        self.b_decided = 0
        self.b_legacy_delivered = 0
        self.b_new_delivered = 0
        self.b_pending = 0
        self.div_new = 0  # new refused what legacy delivered
        self.div_legacy = 0  # legacy refused what new delivered


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
        p50=None if p50 is None else num(p50),
        p95=None if p95 is None else num(p95),
        max=num(s[-1]),
    )


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def provider_stats(scope: ScopeCounters) -> dict[str, ProviderStats]:
    out: dict[str, ProviderStats] = {}
    for name, agg in zip(PROVIDERS, scope.prov, strict=True):
        c = agg.counts
        out[name] = ProviderStats(
            planned=agg.planned,
            delivered=c[O_DELIVERED],
            bounced=c[O_BOUNCED],
            expired=c[O_EXPIRED],
            deleted=c[O_DELETED],
            pending=c[O_PENDING],
            deferrals=agg.deferrals,
            delivery_rate=_ratio(c[O_DELIVERED], agg.planned),
            first_attempt_success=_ratio(agg.first, agg.planned),
            latency_ms=_latency(agg.lat),
            rejections=dict(zip(REASONS, agg.rejections, strict=True)),
            deferral_reasons=dict(zip(REASONS, agg.dreasons, strict=True)),
        )
    return out


def verdict(name: str, scope: ScopeCounters, st: ScopeStats, t: Thresholds) -> Verdict:
    compared = scope.b_decided
    leg_p95 = st.providers["legacy"].latency_ms.p95
    new_p95 = st.providers["new"].latency_ms.p95
    increase = None if leg_p95 is None or new_p95 is None else num(new_p95 - leg_p95)
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
        s = f"new delivered {fmt_pct(ratio)} of what legacy delivered"
        if ratio < t.min_delivery_ratio:
            failed = True
            s += f" (minimum {fmt_pct(t.min_delivery_ratio)})"
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
        parts.append(f"{fmt_pct(pending_ratio)} pending (maximum {fmt_pct(t.max_pending_ratio)})")
    if failed:
        v.verdict = VERDICT_NOT_READY
    v.reason = ", ".join(parts) + f" → {v.verdict}"
    return v


def group_figures(
    groups: dict[str, ScopeCounters], thresholds: Thresholds
) -> tuple[list[ScopeStats], list[Verdict]]:
    """Each group's figures, pilot groups first and "(…)" ones last; each pilot group's verdict."""
    group_stats: list[ScopeStats] = []
    verdicts: list[Verdict] = []
    pilot_first = sorted(
        groups.items(),
        key=lambda kv: (kv[1].pilot_pairs == 0, kv[0].startswith("("), kv[0]),
    )
    for name, scope in pilot_first:
        st = ScopeStats(name, scope.pairs, scope.pilot_pairs, provider_stats(scope))
        group_stats.append(st)
        if scope.pilot_pairs:
            verdicts.append(verdict(name, scope, st, thresholds))
    return group_stats, verdicts


def user_figures(users: dict[str, ScopeCounters]) -> list[ScopeStats]:
    """Each pilot user's figures, by group then address."""
    return [
        ScopeStats(u, s.pairs, s.pilot_pairs, provider_stats(s), group=s.group)
        for u, s in sorted(users.items(), key=lambda kv: (kv[1].group or "", kv[0]))
    ]
