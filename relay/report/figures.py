"""The report's figures: counters folded from the logs, then rates, percentiles, verdicts.

relay.report.logs fills one `ScopeCounters` for the whole log, one per group and
one per pilot user; this module turns them into `ProviderStats` (all traffic),
a `Comparison` (the scope's pilot pairs, both providers on the same pairs),
`ScopeStats` and each pilot group's `Verdict` against the readiness `Thresholds`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from relay.report.format import fmt_int, fmt_pct, fmt_small_pct, num
from relay.report.model import (
    DIVERGENCE_KINDS,
    JOINED,
    MODES,
    O_BOUNCED,
    O_DELETED,
    O_DELIVERED,
    O_EXPIRED,
    O_PENDING,
    PROVIDERS,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_READY,
    VERDICT_READY,
    Comparison,
    Latency,
    ProviderStats,
    ReportError,
    ScopeStats,
    Side,
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
    if "max_divergences" in data:  # report_version 1: a count, which no month of mail meets
        raise ReportError(
            f"{path}: max_divergences: replaced by max_divergence_rate "
            "(a fraction of the judged pairs, default 0.005)"
        )
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
        "b_cutover",
        "b_decided",
        "b_lat",
        "b_legacy_delivered",
        "b_new_delivered",
        "b_pending",
        "div",
        "group",
        "joined",
        "pairs",
        "pilot_pairs",
        "prov",
    )

    def __init__(self, group: str | None = None) -> None:
        self.group = group
        self.pairs = 0
        self.pilot_pairs = 0
        self.prov = (ProviderCounters(), ProviderCounters())
        # the comparison of pilot pairs (docs/report.md, "Comparison")
        self.joined = [[0] * len(JOINED) for _ in MODES]  # per mode, per class
        self.b_decided = 0  # compared pairs: dual or forwarded, both sides final
        self.b_legacy_delivered = 0
        self.b_new_delivered = 0
        self.b_cutover = 0  # cut-over pairs with new final
        self.b_pending = 0  # compared or cut-over pairs not final yet
        self.b_lat = (array("d"), array("d"))  # latencies of dual pairs both delivered
        self.div = dict.fromkeys(DIVERGENCE_KINDS, 0)


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


def _ratio(a: int, b: int, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


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


def comparison(scope: ScopeCounters) -> Comparison:
    """The scope's pilot pairs, legacy against new on the same pairs."""
    compared = scope.b_decided
    sides = {}
    for name, delivered, lat in zip(
        PROVIDERS, (scope.b_legacy_delivered, scope.b_new_delivered), scope.b_lat, strict=True
    ):
        rate = _ratio(delivered, compared)
        sides[name] = Side(delivered, compared - delivered, rate, _latency(lat))
    leg_p95, new_p95 = sides["legacy"].latency_ms.p95, sides["new"].latency_ms.p95
    judged = compared + scope.b_cutover
    c = Comparison(
        pilot_pairs=scope.pilot_pairs,
        joined={j: sum(m[i] for m in scope.joined) for i, j in enumerate(JOINED)},
        joined_by_mode={
            mode: dict(zip(JOINED, counts, strict=True))
            for mode, counts in zip(MODES, scope.joined, strict=True)
        },
        compared_pairs=compared,
        providers=sides,
        delivery_ratio=_ratio(scope.b_new_delivered, scope.b_legacy_delivered),
        p95_increase_ms=None if leg_p95 is None or new_p95 is None else num(new_p95 - leg_p95),
        cutover_pairs=scope.b_cutover,
        judged_pairs=judged,
        divergences=dict(scope.div),
        pending_pairs=scope.b_pending,
        pending_ratio=_ratio(scope.b_pending, judged + scope.b_pending),
    )
    c.divergence_rate = _ratio(c.against_new, judged, 6)
    return c


def _plural(n: int, word: str) -> str:
    return f"{fmt_int(n)} {word}{'' if n == 1 else 's'}"


def verdict(name: str, c: Comparison, t: Thresholds, labels: dict[str, str]) -> Verdict:
    """A pilot group's readiness against the thresholds, with the reason in words."""
    legacy, new = labels["legacy"], labels["new"]
    judged, cut = c.judged_pairs, c.cutover_pairs
    pairs = _plural(judged, "compared pair") if not cut else (
        f"{_plural(judged, 'pair')}, {fmt_int(c.compared_pairs)} compared and "
        f"{fmt_int(cut)} of cut-over users"
    )  # fmt: skip
    if judged < t.min_pairs:
        reason = f"{pairs} (minimum {t.min_pairs}) → {VERDICT_INSUFFICIENT}"
        return Verdict(name, VERDICT_INSUFFICIENT, reason, ["min_pairs"])
    parts: list[str] = []
    failed: list[str] = []
    ratio = c.delivery_ratio
    if ratio is None:
        nothing = f"no {legacy} delivery to compare with" if cut else f"{legacy} delivered nothing"
        parts.append(nothing)
    else:
        s = f"{new} delivered {fmt_pct(ratio)} of what {legacy} delivered"
        if ratio < t.min_delivery_ratio:
            failed.append("min_delivery_ratio")
            s += f" (minimum {fmt_pct(t.min_delivery_ratio)})"
        parts.append(s)
    increase = c.p95_increase_ms
    if increase is None:
        parts.append("p95 n/a")
    else:
        s = f"p95 {increase:+,.0f} ms"
        if increase > t.max_p95_increase_ms:
            failed.append("max_p95_increase_ms")
            s += f" (maximum +{t.max_p95_increase_ms:,.0f} ms)"
        parts.append(s)
    n = c.against_new
    s = _plural(n, "divergence")
    rate = c.divergence_rate or 0.0
    if n or cut:
        s += f" in {_plural(judged, 'compared pair' if not cut else 'pair')}"
        s += f" ({fmt_small_pct(rate)}"
        if rate > t.max_divergence_rate:
            failed.append("max_divergence_rate")
            s += f", maximum {fmt_small_pct(t.max_divergence_rate)}"
        s += ")"
    if cut:
        refused = c.divergences["cutover_refused"]
        s += f", {fmt_int(refused)} of {_plural(cut, 'cut-over pair')} refused by {new}"
    legacy_refused = c.divergences["legacy_refused"]
    if legacy_refused:
        s += f" (+{fmt_int(legacy_refused)} refused by {legacy} only)"
    parts.append(s)
    pending = c.pending_ratio
    if pending is not None and pending > t.max_pending_ratio:
        failed.append("max_pending_ratio")
        parts.append(f"{fmt_pct(pending)} pending (maximum {fmt_pct(t.max_pending_ratio)})")
    v = VERDICT_NOT_READY if failed else VERDICT_READY
    return Verdict(name, v, ", ".join(parts) + f" → {v}", failed)


def group_figures(
    groups: dict[str, ScopeCounters], thresholds: Thresholds, labels: dict[str, str]
) -> tuple[list[ScopeStats], list[Verdict]]:
    """Each group's figures, pilot groups first and "(…)" ones last; each pilot group's verdict."""
    group_stats: list[ScopeStats] = []
    verdicts: list[Verdict] = []
    pilot_first = sorted(
        groups.items(),
        key=lambda kv: (kv[1].pilot_pairs == 0, kv[0].startswith("("), kv[0]),
    )
    for name, scope in pilot_first:
        st = scope_stats(name, scope)
        group_stats.append(st)
        if st.comparison is not None:
            verdicts.append(verdict(name, st.comparison, thresholds, labels))
    return group_stats, verdicts


def scope_stats(name: str, scope: ScopeCounters) -> ScopeStats:
    """All-traffic figures of a scope, and the comparison when it has pilot pairs."""
    cmp = comparison(scope) if scope.pilot_pairs else None
    return ScopeStats(name, scope.pairs, scope.pilot_pairs, provider_stats(scope), scope.group, cmp)


def user_figures(users: dict[str, ScopeCounters]) -> list[ScopeStats]:
    """Each pilot user's figures, by group then address."""
    return [
        scope_stats(u, s)
        for u, s in sorted(users.items(), key=lambda kv: (kv[1].group or "", kv[0]))
    ]
