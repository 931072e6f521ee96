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

from relay.report.reasons import REASONS

if TYPE_CHECKING:
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

REPORT_VERSION = 1

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
    max_divergences: int = Field(0, ge=0)
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
    placement: PlacementReport | None = None  # with --placement

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (stable keys, see docs/report.md)."""
        doc = {
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
        if self.placement is not None:
            doc["placement"] = self.placement.to_dict()
        return doc


def _scope_dict(s: ScopeStats, kind: str) -> dict[str, Any]:
    d: dict[str, Any] = {kind: s.name}
    if kind == "user":
        d["group"] = s.group
    d["pairs"] = s.pairs
    d["pilot_pairs"] = s.pilot_pairs
    d["providers"] = {p: asdict(ps) for p, ps in s.providers.items()}
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
    divergence: str  # "", "new refused", "legacy refused"
