"""The probe's metrics on its own listener (`placement.metrics_port`, host `metrics.host`).

Counters follow the placement log (each event written is counted once);
`relay_probe_lag_seconds` is computed at scrape time: how long the most overdue
look has been waiting (0 when the probe keeps up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from relay.metrics import MetricsServer


class _Live:
    def __init__(self, lag: Callable[[], float], open_looks: Callable[[], int]):
        self.lag = lag
        self.open_looks = open_looks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "relay_probe_lag_seconds",
            "How long the most overdue look has been waiting (0: the probe keeps up)",
            value=self.lag(),
        )
        yield GaugeMetricFamily(
            "relay_probe_open_looks",
            "Delivered copies not yet found or given up",
            value=self.open_looks(),
        )


class ProbeMetrics(MetricsServer):
    def __init__(self) -> None:
        super().__init__()
        self.placements = Counter(
            "relay_placement", "Placement results by provider and folder",
            ["provider", "folder"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "relay_probe_errors", "Looks that failed, by provider and reason",
            ["provider", "reason"], registry=self.registry,
        )  # fmt: skip
        self.commands = Counter(
            "relay_probe_imap_commands", "IMAP commands sent, by provider and command",
            ["provider", "command"], registry=self.registry,
        )  # fmt: skip
        self.rounds = Counter(
            "relay_probe_rounds", "Rounds of looks, by provider", ["provider"],
            registry=self.registry,
        )  # fmt: skip

        self.canary_roundtrip = Histogram(
            "relay_canary_roundtrip_seconds", "Canary arrival: INTERNALDATE minus the relay's 250",
            ["provider"], registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600),
        )  # fmt: skip
        self.canary_placements = Counter(
            "relay_canary_placement", "Canary placements by provider and folder",
            ["provider", "folder"], registry=self.registry,
        )  # fmt: skip
        self.canary_last_inbox = Gauge(
            "relay_canary_last_inbox_timestamp", "When the last canary was found in the Inbox",
            ["provider"], registry=self.registry,
        )  # fmt: skip

    def canary(self, provider: str, folder: str, roundtrip: float | None, now: float) -> None:
        """One canary's placement (kept apart from the pilots' `relay_placement`)."""
        self.canary_placements.labels(provider, folder).inc()
        if roundtrip is not None:
            self.canary_roundtrip.labels(provider).observe(max(roundtrip, 0.0))
        if folder == "inbox":
            self.canary_last_inbox.labels(provider).set(now)

    def live(self, lag: Callable[[], float], open_looks: Callable[[], int]) -> None:
        self.registry.register(_Live(lag, open_looks))
