"""Prometheus metrics, /healthz and /readyz on the `metrics` listener.

Counters follow the delivery log: every event the relay logs is also observed
here, so the two can never disagree. Gauges (queue depth, connections, oldest
message) are read from the running relay at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class _LiveCollector:
    """Gauges computed from the relay's state when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.snapshot()
        depth = GaugeMetricFamily(
            "relay_queue_depth",
            "Open deliveries by provider and state",
            labels=["provider", "state"],
        )
        for provider, states in snap["depth"].items():
            for state, n in states.items():
                depth.add_metric([provider, state], n)
        yield depth
        yield GaugeMetricFamily(
            "relay_open_connections", "Inbound SMTP sessions open", value=snap["connections"]
        )
        yield GaugeMetricFamily(
            "relay_oldest_queued_age_seconds",
            "Age of the oldest message still queued (0 when empty)",
            value=snap["oldest_age"],
        )
        yield CounterMetricFamily(
            "relay_log_events_dropped",
            "Delivery-log events lost because the log stayed unwritable past log_buffer",
            value=snap.get("log_dropped", 0),
        )


class MetricsServer:
    """/metrics of one registry, /healthz and /readyz over plain HTTP/1.1 (relay and probe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ready: Callable[[], bool] = lambda: False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode("ascii", "replace") if b" " in request else ""
            status, ctype, body = await self._route(path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):  # fmt: skip
            pass
        finally:
            writer.close()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, await self.render()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self.ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, host, port)

    async def render(self) -> bytes:
        """The exposition text; on the loop (collectors may read the loop's state)."""
        return generate_latest(self.registry)


class Metrics(MetricsServer):
    def __init__(self) -> None:
        super().__init__()
        self.received = Counter(
            "relay_messages_received", "Messages accepted with a 250", registry=self.registry
        )
        self.rejections = Counter(
            "relay_rejections", "SMTP rejections by stage and reason", ["stage", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.deliveries = Counter(
            "relay_deliveries", "Delivery attempts by provider and outcome",
            ["provider", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "relay_delivery_latency_seconds", "From the 250 to the provider's final 250",
            ["provider"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._delivered: dict[tuple[str, str], Any] = {}  # the counters' children, by labels
        self._latency: dict[str, Any] = {}
        self.auth_results = Counter(
            "relay_auth_results", "Authentication verdicts at ingress by method (spf, dkim "
            "per signature, dmarc, arc; class: the message's class) and result",
            ["method", "result"], registry=self.registry,
        )  # fmt: skip

    def live(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """`snapshot` runs in a thread at each scrape (see `render`)."""
        self.registry.register(_LiveCollector(snapshot))

    async def render(self) -> bytes:
        """In a thread: the relay's snapshot walks the whole queue (about 0.1 s per
        100,000 messages), which on the loop held every session up for as long;
        in a thread the loop keeps the GIL but for a switch interval at a time."""
        return await asyncio.to_thread(generate_latest, self.registry)

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Called for every delivery-log event."""
        if event == "received":
            self.received.inc()
            if "auth" in fields:
                self._auth(fields["auth"])
        elif event == "rejected":
            # a session's summary event stands for `count` refusals
            self.rejections.labels(fields["stage"], fields["reason"]).inc(fields.get("count", 1))
        elif event == "delivery":
            provider, outcome = fields["provider"], fields["outcome"]
            key = (provider, outcome)
            counter = self._delivered.get(key)
            if counter is None:  # labels() validates and locks on every call: once a pair
                counter = self._delivered[key] = self.deliveries.labels(provider, outcome)
                if outcome == "delivered":
                    self._latency[provider] = self.latency.labels(provider)
            counter.inc()
            if outcome == "delivered":
                self._latency[provider].observe(fields["latency_ms"] / 1000)

    def _auth(self, auth: Mapping[str, Any]) -> None:
        for method in ("spf", "dmarc", "arc", "class"):
            self.auth_results.labels(method, auth[method]).inc()
        for sig in auth["dkim"] or [{"result": "none"}]:
            self.auth_results.labels("dkim", sig["result"]).inc()


def oldest_age(received_epochs: Iterator[float]) -> float:
    with contextlib.suppress(ValueError):
        return max(0.0, time.time() - min(received_epochs))
    return 0.0
