"""The probe's metrics on its own listener (`placement.metrics_port`, host `metrics.host`).

Counters follow the placement log (each event written is counted once);
`relay_probe_lag_seconds` is computed at scrape time: how long the most overdue
look has been waiting (0 when the probe keeps up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter
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

    def live(self, lag: Callable[[], float], open_looks: Callable[[], int]) -> None:
        self.registry.register(_Live(lag, open_looks))
