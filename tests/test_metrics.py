"""/metrics, /healthz, /readyz on the metrics listener of a running relay."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

import aiosmtplib
import pytest

from relay.testing import Rule

pytestmark = pytest.mark.timeout(30)


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


async def test_metrics_follow_the_delivery_log(relay_env) -> None:
    env = await relay_env()
    await env.legacy.stop()  # legacy down: its copy stays queued
    env.new.add(Rule("reject", rcpt="alice@example-new.com", code=550, text="5.7.1 spam"))
    await env.send(["alice@example.com"])
    await env.send(["bob@example.com"])
    await env.wait_for(lambda: len(env.events("delivery")) >= 3, what="attempts")
    port = env.relay.metrics_port
    status, text = await get(port, "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert "relay_messages_received_total 2.0" in lines
    assert 'relay_deliveries_total{outcome="delivered",provider="new"} 1.0' in lines
    assert 'relay_deliveries_total{outcome="bounced",provider="new"} 1.0' in lines
    assert 'relay_queue_depth{provider="legacy",state="deferred"} 1.0' in lines
    assert 'relay_delivery_latency_seconds_count{provider="new"} 1.0' in lines
    assert any(line.startswith("relay_oldest_queued_age_seconds ") for line in lines)
    assert "relay_open_connections 0.0" in lines

    smtp_rejections = 'relay_rejections_total{reason="relay denied",stage="rcpt"} 1.0'
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.port, start_tls=False)
    await smtp.connect()
    await smtp.mail("s@x.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused):
        await smtp.rcpt("u@elsewhere.org")
    status, text = await get(port, "/metrics")
    assert smtp_rejections in text.splitlines()
    assert "relay_open_connections 1.0" in text.splitlines()
    await smtp.quit()

    # the queue walk of a scrape runs off the event loop's thread (a deep queue
    # held every session up for it), and its figures are the queue's
    walked: list[bool] = []
    depth = env.relay.scheduler.depth

    def watched() -> dict[str, dict[str, int]]:
        walked.append(threading.current_thread() is threading.main_thread())
        return depth()

    env.relay.scheduler.depth = watched  # type: ignore[method-assign]
    status, text = await get(port, "/metrics")
    assert walked == [False]
    assert 'relay_queue_depth{provider="legacy",state="deferred"} 1.0' in text.splitlines()

    assert await get(port, "/healthz") == (200, "ok\n")
    assert await get(port, "/readyz") == (200, "ready\n")
    assert (await get(port, "/nope"))[0] == 404
    env.relay.handler.shutting_down = True
    assert await get(port, "/readyz") == (503, "not ready\n")
