"""The report's data model: what a comparison says, independent of how it is shown.

The unit is a (message, original recipient) pair. `Report` is what `build_report`
(relay.report.logs) returns and what every output format renders; `to_dict` is the
JSON document, whose keys are stable (docs/report.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from relay.report.completeness import GroupCompleteness
from relay.report.reasons import REASONS

if TYPE_CHECKING:
    from relay.report.canaries import CanaryReport
    from relay.report.placement import PlacementReport

PROVIDERS: tuple[str, str] = ("legacy", "new")
# Position of each provider in the aggregation's per-provider pairs and lists.
PROVIDER_INDEX: dict[str, int] = {"legacy": 0, "new": 1}

# Outcome categories of a planned (pair, provider) delivery, in display order,
# and their positions (the aggregation counts outcomes in lists indexed so).
OUTCOMES: tuple[str, ...] = ("delivered", "bounced", "expired", "deleted", "pending")
O_DELIVERED, O_BOUNCED, O_EXPIRED, O_DELETED, O_PENDING = range(5)

NON_PILOT_GROUP = "(non-pilot)"
NO_GROUP = "(none)"

VERDICT_READY = "ready"
VERDICT_NOT_READY = "not ready"
VERDICT_INSUFFICIENT = "insufficient data"

REPORT_VERSION = 2

# Joined class of a pilot pair: who delivered it (docs/report.md, "Joined classes").
# Keys are stable (JSON, CSV); positions index the per-class counter lists.
JOINED: tuple[str, ...] = ("both_delivered", "legacy_only", "new_only", "both_failed", "pending")
J_BOTH, J_LEGACY_ONLY, J_NEW_ONLY, J_BOTH_FAILED, J_PENDING = range(5)

# How a pilot pair is observed (its plan): at both providers (dual mode), as a
# forwarded copy (legacy holds the original), as a cut-over user's (new only,
# primary), as a paused user's (legacy only). Positions index counter lists.
MODES: tuple[str, ...] = ("dual", "forwarded", "cutover", "paused")
M_DUAL, M_FORWARDED, M_CUTOVER, M_PAUSED = range(4)

# Kinds of divergence, in display order: what the new provider is judged on first.
DIVERGENCE_KINDS: tuple[str, ...] = ("new_refused", "cutover_refused", "legacy_refused")

# Latency histogram of final deliveries (for the HTML chart): inclusive upper
# bounds in ms; one more bucket takes everything above the last bound.
LATENCY_BUCKETS_MS: tuple[int, ...] = (
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000,
    300_000, 900_000, 3_600_000, 21_600_000, 86_400_000,
)  # fmt: skip


class Thresholds(BaseModel):
    """Readiness thresholds (defaults documented in docs/report.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    min_pairs: int = Field(20, ge=0)
    min_delivery_ratio: float = Field(0.99, ge=0)
    max_p95_increase_ms: int = 60000
    max_divergence_rate: float = Field(0.005, ge=0, le=1)
    max_pending_ratio: float = Field(0.05, ge=0, le=1)
    # placement (with --placement; relay.report.placement)
    min_probed_pairs: int = Field(20, ge=0)
    max_junk_rate_increase: float = Field(0.02, ge=-1, le=1)


class ReportError(Exception):
    """An input problem worth a usage error (exit 2): missing file, bad thresholds."""


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
class Side:
    """One provider's side of the compared pilot pairs (the same pairs for both)."""

    delivered: int = 0
    refused: int = 0  # compared pairs this provider did not deliver
    delivery_rate: float | None = None  # delivered / compared pairs
    latency_ms: Latency = field(default_factory=Latency)  # over pairs both delivered


@dataclass
class Comparison:
    """The legacy/new comparison of a scope's pilot pairs (docs/report.md, "Comparison").

    Compared pairs are pilot pairs observed at both providers (dual mode; a
    forwarded copy's legacy side counts as delivered) with both sides final.
    Cut-over pairs (new-only mode) are judged on their own: a refusal by new is a
    divergence against nothing. Every rate of the comparison has one of these
    populations as denominator, named where it is shown.
    """

    pilot_pairs: int = 0
    joined: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOINED, 0))
    joined_by_mode: dict[str, dict[str, int]] = field(default_factory=dict)  # MODES -> joined
    compared_pairs: int = 0
    providers: dict[str, Side] = field(default_factory=dict)
    delivery_ratio: float | None = None  # new delivered / legacy delivered
    p95_increase_ms: float | None = None
    cutover_pairs: int = 0  # decided pairs of cut-over users
    judged_pairs: int = 0  # compared + cut-over pairs
    divergences: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIVERGENCE_KINDS, 0))
    divergence_rate: float | None = None  # (new_refused + cutover_refused) / judged pairs
    pending_pairs: int = 0  # compared or cut-over pairs with a side not final
    pending_ratio: float | None = None  # pending / (judged + pending)

    @property
    def against_new(self) -> int:
        """Divergences that count against the new provider."""
        return self.divergences["new_refused"] + self.divergences["cutover_refused"]


@dataclass
class ScopeStats:
    """Figures for the whole log, one group or one pilot user."""

    name: str
    pairs: int
    pilot_pairs: int
    providers: dict[str, ProviderStats]
    group: str | None = None  # users: their group
    comparison: Comparison | None = None  # scopes with pilot pairs


@dataclass
class Outcome:
    outcome: str  # delivered | bounced | expired | deleted | pending | "" (not planned)
    ts: str | None = None  # time of the final event
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
    kind: str  # one of DIVERGENCE_KINDS
    refused_by: str  # "new" or "legacy"
    legacy: Outcome
    new: Outcome

    @property
    def refusal(self) -> Outcome:
        """The refusing side."""
        return self.new if self.refused_by == "new" else self.legacy


@dataclass
class DivergenceGroup:
    """Divergences of one kind with the same reply (ids, addresses and numbers aside)."""

    kind: str
    reason: str  # reason class of the reply
    smtp_code: int | None
    enhanced_code: str | None
    reply: str  # the reply of the first one received
    count: int
    users: int  # distinct recipients
    groups: list[str]
    first_received: str
    last_received: str
    examples: list[dict[str, str]]  # up to 3 {node, queue_id}


@dataclass
class Verdict:
    """A pilot group's readiness; its figures are the group's `comparison`."""

    group: str
    verdict: str
    reason: str
    failed: list[str]  # the thresholds not met


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
    """Divergences in one UTC hour, by kind, at the time of the refusing reply."""

    hour: str  # the hour's start, e.g. "2026-11-25T09:00:00Z"
    divergences: dict[str, int]  # kind -> divergences


# a provider failing this share of aligned_pass copies gets the plain sentence
FAIRNESS_ALERT_RATE = 0.05


@dataclass
class FairnessRow:
    """relay/report/auth.py: one provider's own verdicts on mail the relay judged
    aligned_pass."""

    provider: str
    aligned_pass: int  # copies the relay judged aligned_pass that the provider's verdict covers
    fails: dict[str, int]  # token -> copies it said fail (or softfail)
    any_fail: int
    any_fail_rate: float | None
    note: str | None  # the plain sentence when the rate is high


@dataclass
class AuthFairness:
    rows: list[FairnessRow] = field(default_factory=list)
    absent: str | None = None  # why there is no table

    def to_dict(self) -> dict[str, Any]:
        return {
            "absent": self.absent,
            "alert_rate": FAIRNESS_ALERT_RATE,
            "rows": [vars(r) for r in self.rows],
        }


@dataclass
class Report:
    inputs: InputStats
    filters: dict[str, str | None]
    thresholds: Thresholds
    totals: Totals
    comparison: Comparison  # every pilot pair
    providers: dict[str, ProviderStats]  # all traffic
    groups: list[ScopeStats]
    users: list[ScopeStats]
    divergences: list[Divergence]
    divergence_groups: list[DivergenceGroup]
    verdicts: list[Verdict]
    labels: dict[str, str] = field(default_factory=lambda: {p: p for p in PROVIDERS})
    tz: str = "UTC"  # time zone of the times shown in text and HTML
    pseudonymized: bool = False
    completeness: list[GroupCompleteness] = field(default_factory=list)
    # Chart data (HTML report; not in the JSON document): provider -> pilot pairs
    # both delivered per LATENCY_BUCKETS_MS bucket (len + 1 counts), and
    # divergences per hour, in order.
    latency_histogram: dict[str, list[int]] = field(default_factory=dict)
    hourly: list[HourCounts] = field(default_factory=list)
    placement: PlacementReport | None = None  # with --placement
    canaries: CanaryReport | None = None  # when the logs hold canaries (relay/report/canaries.py)
    # relay/report/auth.py: the figures per authentication class, and the fairness table
    by_auth: list[ScopeStats] = field(default_factory=list)
    fairness: AuthFairness = field(default_factory=AuthFairness)

    def group_comparison(self, group: str) -> Comparison:
        """A pilot group's comparison (the figures of its verdict)."""
        for g in self.groups:
            if g.name == group and g.comparison is not None:
                return g.comparison
        raise KeyError(group)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (stable keys, see docs/report.md)."""
        doc = {
            "report_version": REPORT_VERSION,
            "inputs": asdict(self.inputs),
            "filters": dict(self.filters),
            "thresholds": self.thresholds.model_dump(),
            "labels": dict(self.labels),
            "tz": self.tz,
            "pseudonymized": self.pseudonymized,
            "totals": asdict(self.totals),
            "comparison": asdict(self.comparison),
            "providers": {p: asdict(s) for p, s in self.providers.items()},
            "groups": [_scope_dict(s, "group") for s in self.groups],
            "users": [_scope_dict(s, "user") for s in self.users],
            "divergences": [asdict(d) for d in self.divergences],
            "divergence_groups": [asdict(g) for g in self.divergence_groups],
            "verdicts": [asdict(v) for v in self.verdicts],
            "by_authentication": [_scope_dict(s, "class") for s in self.by_auth],
            "fairness": self.fairness.to_dict(),
            "completeness": [asdict(c) for c in self.completeness],
        }
        if self.placement is not None:
            doc["placement"] = self.placement.to_dict()
        if self.canaries is not None:
            doc["canaries"] = self.canaries.to_dict()
        return doc


def _scope_dict(s: ScopeStats, kind: str) -> dict[str, Any]:
    d: dict[str, Any] = {kind: s.name}
    if kind == "user":
        d["group"] = s.group
    d["pairs"] = s.pairs
    d["pilot_pairs"] = s.pilot_pairs
    d["providers"] = {p: asdict(ps) for p, ps in s.providers.items()}
    d["comparison"] = None if s.comparison is None else asdict(s.comparison)
    return d


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
    divergence: str  # "" or one of DIVERGENCE_KINDS
    joined: str  # "" (not a pilot pair) or one of JOINED
    auth_class: str  # the class the relay gave the message at ingress, "" without a verdict
