"""Delivery engine (issue 4): the relay in-process against scriptable loopback providers.

Every test runs a real `Relay` (ingress, spool, scheduler, delivery) with a
`FakeClock`, sends mail to it with aiosmtplib and looks at what the providers
received byte for byte and at the delivery log. Backoff is skipped by
advancing the fake clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest
import yaml

from relay import config
from relay.app import Relay
from relay.delivery.content import _scan as content_scan
from relay.delivery.pool import Agent
from relay.delivery.reply import Attempt
from relay.records import Envelope, PlanEntry, StateLine
from relay.scheduler import Clock, Scheduler
from relay.testing import FakeClock, Provider, ReceivedMessage, Rule
from tests.conftest import write_config

pytestmark = pytest.mark.timeout(20)

# One transaction on a new connection, closed afterwards: an agent that caches nothing.
send_once = Agent(max_uses=0).send

SENDER = "sender@example.org"
DELIVERY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "event": str, "ts": str, "node": str, "queue_id": str, "rcpt": str, "provider": str,
    "delivered_to": str, "role": str, "group": (str, type(None)), "mode": (str, type(None)),
    "pilot": bool, "outcome": str, "smtp_code": (int, type(None)),
    "enhanced_code": (str, type(None)), "smtp_response": str, "attempt": int,
    "latency_ms": int, "tls": (str, type(None)), "remote_id": (str, type(None)),
}  # fmt: skip


def message(marker: str, body: bytes = b"") -> bytes:
    """A message whose content exercises fidelity: dot lines, a long line, odd spacing."""
    return (
        f"From: Sender <{SENDER}>\r\n"
        f"To: someone@example.com\r\n"
        f"Subject: test {marker}\r\n"
        f"Message-ID: <{marker}@test>\r\n"
        f"X-Test-Marker: {marker}\r\n"
        "\r\n"
    ).encode() + (
        b"Hello.\r\n"
        b".a line that starts with a dot\r\n"
        b"..two dots\r\n"
        b".\tdot tab\r\n"
        b"trailing spaces   \r\n"
        b"\r\n"
        + b"x" * 5000 + b"\r\n"
        + body
        + b"end\r\n"
    )  # fmt: skip


@dataclass
class Sent:
    queue_id: str
    marker: str
    data: bytes


@dataclass
class Env:
    """A running relay, its providers and its delivery log."""

    relay: Relay
    legacy: Provider
    new: Provider
    bounce: Provider
    clock: FakeClock
    root: Path
    counter: list[int] = field(default_factory=lambda: [0])

    @property
    def log_path(self) -> Path:
        return self.root / "var" / "deliveries.jsonl"

    @property
    def queue_dir(self) -> Path:
        return self.root / "var" / "spool" / "queue"

    def marker(self) -> str:
        self.counter[0] += 1
        return f"m{self.counter[0]}-{random.getrandbits(32):08x}"

    async def send(
        self,
        rcpts: list[str],
        *,
        sender: str = SENDER,
        options: Iterable[str] = (),
        body: bytes = b"",
        data: bytes | None = None,
    ) -> Sent:
        marker = self.marker()
        content = data if data is not None else message(marker, body)
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=self.relay.port, start_tls=False, timeout=10,
            local_hostname="client.test",
        )  # fmt: skip
        async with smtp:
            errors, reply = await smtp.sendmail(sender, rcpts, content, mail_options=list(options))
        assert errors == {}, errors
        m = re.search(r"queued as (\S+)", reply)
        assert m, reply
        return Sent(m.group(1), marker, content)

    def events(self, event: str = "delivery", **match: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                out.append(e)
        return out

    async def wait_events(
        self, n: int, timeout: float = 5, event: str = "delivery", **match: Any
    ) -> list[dict[str, Any]]:
        return await until(
            lambda: (lambda es: es if len(es) >= n else None)(self.events(event, **match)),
            timeout, f"{n} {event} events matching {match}",
        )  # fmt: skip

    async def idle(self, timeout: float = 5) -> None:
        """Wait until the scheduler has nothing in flight."""
        await until(lambda: not self.relay.scheduler._in_flight, timeout, "scheduler idle")

    def queue_files(self) -> list[str]:
        return sorted(p.name for p in self.queue_dir.iterdir())


async def until(predicate: Callable[[], Any], timeout: float = 5, what: str = "condition") -> Any:
    """Poll `predicate` (every 10 ms) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def copies(p: Provider, marker: str) -> list[ReceivedMessage]:
    """What `p` accepted that carries `marker` (DSNs quoting it excluded)."""
    needle = f"X-Test-Marker: {marker}\r\n".encode()
    return [m for m in p.messages if needle in m.data and b"multipart/report" not in m.data]


TRACE = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby relay\.test \(relay\) with ESMTP id (?P<id1>\w+)(?:\r\n\tfor <[^>]+>)?;"
    rb" [^\r\n]+\r\n"
    rb"X-Relay-Trace: t1 (?P<id2>\w+)\r\n"
)


def assert_faithful(got: ReceivedMessage, sent: Sent) -> None:
    """Exactly the DATA content, with only the relay's two headers in front."""
    assert got.data.endswith(sent.data), "content changed on the way"
    prefix = got.data[: len(got.data) - len(sent.data)]
    m = TRACE.fullmatch(prefix)
    assert m, prefix
    assert m["id1"].decode() == m["id2"].decode() == sent.queue_id


def provider_yaml(p: Provider, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host": "127.0.0.1", "port": p.port, "connect_timeout": 2, "command_timeout": 5,
        "data_timeout": 5, "max_connections": 4,
    }  # fmt: skip
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}  # None: leave the key out


Factory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[Factory]:
    """make_env(legacy=Provider(...), new=..., legacy_cfg={...}, retry={...}, extra={...})
    → Env; `extra`: more top-level relay.yaml keys."""
    stack = contextlib.AsyncExitStack()
    counter = [0]

    async def make(
        *,
        legacy: Provider | None = None,
        new: Provider | None = None,
        legacy_cfg: dict[str, Any] | None = None,
        new_cfg: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
        start_legacy: bool = True,
        clock: Clock | None = None,
        root: Path | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Env:
        legacy = legacy or Provider("legacy")
        new = new or Provider("new")
        bounce = Provider("bounce")
        for p in (legacy, new, bounce):
            if not p.running:
                await p.start()
                stack.push_async_callback(p.stop)
        if not start_legacy:  # a port with nothing listening; legacy.start() reopens it
            await legacy.stop()
        counter[0] += 1
        root = root or tmp_path / f"relay{counter[0]}"
        settings = {
            "listen": {"port": 0, "hostname": "relay.test"},
            "node": "t1",
            "domains": ["example.com", "dev.example.com"],
            "providers": {
                "legacy": provider_yaml(legacy, **(legacy_cfg or {})),
                "new": provider_yaml(new, **(new_cfg or {})),
            },
            "bounce": provider_yaml(bounce),
            "spool": "../var/spool",
            "log": "../var/deliveries.jsonl",
            "retry": retry or {"schedule": [60, 300], "max_age": 3600},
            "limits": {"min_free_space": 0},
            "shutdown_timeout": 2,
            "metrics": {"port": 0},
            **(extra or {}),
        }
        cfg = config.load(write_config(root / "config", yaml.safe_dump(settings)))
        clock = clock or FakeClock()
        relay = Relay(cfg, clock=clock)
        await relay.start()
        stack.push_async_callback(relay.stop)
        return Env(relay, legacy, new, bounce, cast(FakeClock, clock), root)

    async with stack:
        yield make


# ------------------------------------------------------------------ routing and fidelity


async def test_pilot_mail_reaches_both_providers_byte_equal(make_env: Factory) -> None:
    env = await make_env()
    sent = await env.send(["alice@example.com"])
    await env.legacy.wait_for_messages(1)
    await env.new.wait_for_messages(1)
    [old] = copies(env.legacy, sent.marker)
    [new] = copies(env.new, sent.marker)
    assert old.rcpts == ["alice@example.com"]
    assert new.rcpts == ["alice@example-new.com"]
    assert old.mail_from == new.mail_from == SENDER
    assert_faithful(old, sent)
    assert_faithful(new, sent)
    assert old.data == new.data
    await env.wait_events(2, outcome="delivered")
    await until(lambda: env.queue_files() == [], what="spool emptied")


async def test_non_pilot_only_legacy_and_new_only_only_new(make_env: Factory) -> None:
    env = await make_env()
    plain = await env.send(["zed@example.com"])
    moved = await env.send(["bob@example.com"])
    paused = await env.send(["dave@example.com"])
    await env.wait_events(3, outcome="delivered")
    await env.idle()
    assert [m.rcpts for m in copies(env.legacy, plain.marker)] == [["zed@example.com"]]
    assert copies(env.new, plain.marker) == []
    assert copies(env.legacy, moved.marker) == []
    [m] = copies(env.new, moved.marker)
    assert m.rcpts == ["robert@example-new.com"]
    assert_faithful(m, moved)
    assert [m.rcpts for m in copies(env.legacy, paused.marker)] == [["dave@example.com"]]
    assert copies(env.new, paused.marker) == []


async def test_the_attempt_that_finishes_a_message_writes_no_state_line(
    make_env: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its removal stands for its state lines (one spool batch): a message with one
    delivery never gets a state file. (A dual one saves its second line only when
    the first attempt is over by then: timing, not asserted.)"""
    from relay.spool import Spool

    appended: list[str] = []
    real = Spool._append_state

    def watch(self: Spool, queue_id: str, lines: bytes) -> None:
        appended.append(queue_id)
        real(self, queue_id, lines)

    monkeypatch.setattr(Spool, "_append_state", watch)
    env = await make_env()
    single = await env.send(["zed@example.com"])  # legacy only
    await env.wait_events(1, outcome="delivered")
    await env.idle()
    await until(lambda: not env.queue_files(), what="spool empty")
    assert single.queue_id not in appended, appended
    assert not env.relay.scheduler.messages


@contextlib.asynccontextmanager
async def two_copy_scheduler(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    new_reply: asyncio.Event,
    new_free: asyncio.Event | None = None,
) -> AsyncIterator[tuple[Scheduler, list[str], str]]:
    """A scheduler on a real spool and log whose sender answers legacy at once and
    `new` once `new_reply` is set; one pilot message (a copy for each) queued.
    `new_free`: new's delivery workers take nothing until it is set (as when each
    is busy with other mail), and legacy answers without waiting for new's start.
    Yields the scheduler, the queue ids given state lines, the message's id."""
    from relay.delivery.reply import Reply
    from relay.log import DeliveryLog
    from relay.spool import Spool

    appended: list[str] = []
    real = Spool._append_state

    def watch(self: Spool, queue_id: str, lines: bytes) -> None:
        appended.append(queue_id)
        real(self, queue_id, lines)

    monkeypatch.setattr(Spool, "_append_state", watch)
    providers = {
        "legacy": {"host": "127.0.0.1", "port": 1},
        "new": {"host": "127.0.0.1", "port": 2},
    }
    settings = config.RelaySettings.model_validate(
        {"domains": ["example.com"], "providers": providers}
    )

    new_sending = asyncio.Event()

    async def sender(cfg: Any, mail_from: str, rcpts: list[str], *rest: Any, **kw: Any) -> Attempt:
        if cfg.port == 2:
            new_sending.set()
            await new_reply.wait()
        elif new_free is None:  # legacy answers once new's is under way: both in flight
            await new_sending.wait()
        ok = Reply(250, f"2.0.0 Ok: queued as P{cfg.port}", "after_data", "2.0.0")
        return Attempt(dict.fromkeys(rcpts, ok), remote_id=f"P{cfg.port}")

    spool = Spool(tmp_path / "spool")
    await spool.start()
    log = DeliveryLog(tmp_path / "deliveries.jsonl", node="t")
    sched = Scheduler(settings, spool, log, sender=sender)
    qid = "0000000000A000000000001"
    plan = (
        PlanEntry("alice@example.com", "legacy", "alice@example.com", "primary", "g", "dual", True),
        PlanEntry("alice@example.com", "new", "alice@example-new.com", "shadow", "g", "dual", True),
    )
    env = Envelope(qid, "", 1.0, SENDER, ("alice@example.com",), (), "127.0.0.1", None, 10,
                   False, plan, False)  # fmt: skip
    incoming = spool.begin(qid)
    await spool.write(incoming, b"Subject: x\r\n\r\nbody\r\n")
    await spool.commit(incoming, env)
    sched.add(qid, env)
    if new_free is not None:
        take, free = sched._take, new_free

        async def busy_take(provider: str) -> Any:
            if provider == "new":
                await free.wait()
            return await take(provider)

        monkeypatch.setattr(sched, "_take", busy_take)
    sched.start()
    try:
        yield sched, appended, qid
    finally:
        new_reply.set()
        await sched.drain(5)
        await spool.stop()
        log.close()


def delivered(tmp_path: Path) -> dict[str, dict[str, Any]]:
    lines = (tmp_path / "deliveries.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines]
    return {e["provider"]: e for e in events if e.get("outcome") == "delivered"}


async def test_the_first_of_two_copies_leaves_its_record_to_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both copies in flight: the first to end (legacy) waits for the other, which
    records both with one removal: the message never gets a state file, and each
    event is logged with its own attempt's remote id."""
    new_reply = asyncio.Event()
    async with two_copy_scheduler(tmp_path, monkeypatch, new_reply) as (sched, appended, qid):
        await until(lambda: qid in sched._held, 5, "legacy's outcome left to new")
        assert not (tmp_path / "deliveries.jsonl").exists() or not delivered(tmp_path)
        new_reply.set()
        await until(lambda: not sched.messages, 5, "the message removed")
        assert appended == []
        assert not any(sched.spool.queue.iterdir())
        events = delivered(tmp_path)
        assert {p: e["remote_id"] for p, e in events.items()} == {"legacy": "P1", "new": "P2"}


async def test_a_copy_waiting_for_a_connection_takes_the_first_copys_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other copy due but not yet taken when the first ends, its provider's
    connections all busy (at 100 KiB under load most are): the first still leaves
    its outcome to it, and once a connection is free the other records both with
    one removal: no state file."""
    new_reply, new_free = asyncio.Event(), asyncio.Event()
    new_reply.set()
    async with two_copy_scheduler(tmp_path, monkeypatch, new_reply, new_free) as (
        sched,
        appended,
        qid,
    ):
        await until(lambda: qid in sched._held, 5, "legacy's outcome left to new")
        assert (qid, "new") not in sched._claimed  # not taken: new's workers are busy
        new_free.set()
        await until(lambda: not sched.messages, 5, "the message removed")
        assert appended == []
        assert not any(sched.spool.queue.iterdir())
        assert set(delivered(tmp_path)) == {"legacy", "new"}


async def test_a_copy_whose_sibling_is_slow_records_its_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other copy not done within SIBLING_WAIT: the first records and logs its
    own outcome (a state line), as an attempt alone does; the second then removes."""
    from relay.scheduler import SIBLING_WAIT

    new_reply = asyncio.Event()
    async with two_copy_scheduler(tmp_path, monkeypatch, new_reply) as (sched, appended, qid):
        await until(lambda: "legacy" in delivered(tmp_path), 5 + SIBLING_WAIT, "legacy logged")
        assert appended == [qid] and "new" not in delivered(tmp_path)
        assert [s.status for s in sched.spool.load(qid).states] == ["delivered"]
        new_reply.set()
        await until(lambda: not sched.messages, 5, "the message removed")
        assert set(delivered(tmp_path)) == {"legacy", "new"}


async def test_a_message_leaves_the_queue_with_its_events_on_file(make_env: Factory) -> None:
    """The attempt that finishes a message removes its files first, then logs: its
    events are written then and there, not at the end of the loop's pass (the log
    batches lines per pass), so a message gone from the queue has them on file."""
    env = await make_env()
    missing: list[str] = []
    log_path = env.relay.log.file.path

    class Queue(dict):  # type: ignore[type-arg]
        """The scheduler's queue, checking the log file as each message leaves it."""

        def pop(self, key: Any, *default: Any) -> Any:
            if key in self:
                written = [json.loads(x) for x in log_path.read_text().splitlines()]
                if not any(
                    e.get("event") == "delivery" and e.get("queue_id") == key for e in written
                ):
                    missing.append(key)
            return super().pop(key, *default)

    env.relay.scheduler.messages = Queue(env.relay.scheduler.messages)
    sent = await env.send(["zed@example.com"])  # legacy only: one attempt finishes it
    await env.wait_events(1, outcome="delivered")
    await until(lambda: not env.relay.scheduler.messages, what="queue empty")
    assert missing == [], missing
    assert env.events(queue_id=sent.queue_id, outcome="delivered")


async def test_one_transaction_per_message_and_provider(make_env: Factory) -> None:
    env = await make_env()
    rcpts = ["alice@example.com", "zed@example.com", "Ann@Dev.Example.com", "bob@example.com"]
    sent = await env.send(rcpts)
    await env.wait_events(6, outcome="delivered")
    [old] = copies(env.legacy, sent.marker)
    [new] = copies(env.new, sent.marker)
    assert old.rcpts == ["alice@example.com", "zed@example.com", "Ann@dev.example.com"]
    assert new.rcpts == [
        "alice@example-new.com", "Ann@dev.example-new.com", "robert@example-new.com",
    ]  # fmt: skip
    assert_faithful(old, sent)
    assert_faithful(new, sent)
    assert env.legacy.connections == env.new.connections == 1


async def test_null_sender_reaches_both(make_env: Factory) -> None:
    env = await make_env()
    sent = await env.send(["alice@example.com"], sender="")
    await env.wait_events(2, outcome="delivered")
    for p in (env.legacy, env.new):
        [m] = copies(p, sent.marker)
        assert m.mail_from == ""
        assert any(c.startswith("MAIL FROM:<>") for c in p.commands), p.commands
        assert_faithful(m, sent)


async def test_delivery_log_has_every_spec_field(make_env: Factory) -> None:
    env = await make_env()
    env.new.add(Rule("reject", stage="after_data", text="5.7.1 Spam detected"))
    sent = await env.send(["alice@example.com", "ann@dev.example.com"])
    events = await env.wait_events(4)
    received = env.events("received", queue_id=sent.queue_id)
    assert len(received) == 1
    plan = received[0]["plan"]
    for e in events:
        for key, kind in DELIVERY_FIELDS.items():
            assert key in e, key
            assert isinstance(e[key], kind), (key, e[key])
        assert e["queue_id"] == sent.queue_id
        assert e["attempt"] == 1
        assert e["latency_ms"] >= 0
        assert e["tls"] is None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"])
        step = {k: e[k] for k in ("rcpt", "provider", "delivered_to", "role", "group", "mode")}
        assert any(all(p[k] == v for k, v in step.items()) and p["pilot"] is e["pilot"]
                   for p in plan), e  # fmt: skip
    legacy = [e for e in events if e["provider"] == "legacy"]
    new = [e for e in events if e["provider"] == "new"]
    assert {e["outcome"] for e in legacy} == {"delivered"}
    ids = {m.queue_id for m in env.legacy.messages}
    assert all(e["remote_id"] in ids and e["smtp_code"] == 250 for e in legacy)
    assert all(e["enhanced_code"] == "2.0.0" for e in legacy)
    assert {e["outcome"] for e in new} == {"bounced"}
    for e in new:
        assert (e["smtp_code"], e["enhanced_code"]) == (550, "5.7.1")
        assert "Spam detected" in e["smtp_response"]
        assert e["remote_id"] is None
        assert e["role"] == "shadow" and e["pilot"] is True
    assert {(e["rcpt"], e["group"]) for e in events} == {
        ("alice@example.com", "sales"), ("ann@dev.example.com", "dev"),
    }  # fmt: skip


# ------------------------------------------------------------------------ independence


async def test_legacy_down_new_at_once_legacy_after_return(make_env: Factory) -> None:
    env = await make_env(start_legacy=False)
    sent = [await env.send(["alice@example.com"]) for _ in range(5)]
    await env.new.wait_for_messages(5, timeout=5)  # not held up by the dead legacy
    deferred = await env.wait_events(5, provider="legacy", outcome="deferred")
    assert all(e["smtp_code"] is None and e["attempt"] == 1 for e in deferred)
    assert all("connect" in e["smtp_response"] for e in deferred), deferred[0]
    await env.idle()
    assert len(env.queue_files()) == 10  # .msg + .state each: still owed to legacy

    await env.legacy.start()  # same port
    env.clock.advance(67)  # past the first retry, 60 s + 10 %
    await env.legacy.wait_for_messages(5)
    await env.wait_events(5, provider="legacy", outcome="delivered")
    await until(lambda: env.queue_files() == [], what="spool emptied")
    for s in sent:  # nothing lost, nothing twice
        assert len(copies(env.legacy, s.marker)) == 1
        assert len(copies(env.new, s.marker)) == 1
        assert_faithful(copies(env.legacy, s.marker)[0], s)
    delivered = env.events(provider="legacy", outcome="delivered")
    assert {e["attempt"] for e in delivered} == {2}
    assert len(env.events(provider="new")) == 5


async def test_legacy_down_real_clock_short_schedule(make_env: Factory) -> None:
    """The same with the real clock: the workers' own timers bring the retry."""
    env = await make_env(
        start_legacy=False, retry={"schedule": [0.2], "max_age": 60},
        clock=Clock(),
    )  # fmt: skip
    sent = await env.send(["alice@example.com"])
    await env.new.wait_for_messages(1)
    await env.wait_events(1, provider="legacy", outcome="deferred")
    await env.legacy.start()
    await env.legacy.wait_for_messages(1, timeout=5)
    assert len(copies(env.legacy, sent.marker)) == 1
    await until(lambda: env.queue_files() == [], what="spool emptied")


async def test_legacy_hanging_after_data_does_not_hold_new(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("hang", stage="after_data"))
    env = await make_env(legacy=legacy, legacy_cfg={"data_timeout": 1.5})
    sent = [await env.send(["alice@example.com"]) for _ in range(3)]
    await env.new.wait_for_messages(3, timeout=1.4)
    # legacy is still hanging: nothing has come back from it yet
    assert env.events(provider="legacy") == []
    assert env.legacy.messages == []
    deferred = await env.wait_events(3, timeout=5, provider="legacy", outcome="deferred")
    assert all(e["smtp_code"] is None and "timeout" in e["smtp_response"] for e in deferred)
    assert len(env.legacy.dropped_after_data) == 3  # the provider may have them

    env.legacy.clear()
    env.clock.advance(67)
    await env.wait_events(3, provider="legacy", outcome="delivered")
    for s in sent:
        assert len(copies(env.legacy, s.marker)) == 1
        assert len(copies(env.new, s.marker)) == 1
    await until(lambda: env.queue_files() == [], what="spool emptied")


@pytest.mark.parametrize("stage", ["connect", "ehlo", "mail", "rcpt", "data", "after_data"])
async def test_hang_at_any_stage_only_defers(make_env: Factory, stage: str) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("hang", stage=stage, times=1))  # type: ignore[arg-type]
    quick = {"connect_timeout": 0.3, "command_timeout": 0.3, "data_timeout": 0.3}
    env = await make_env(legacy=legacy, legacy_cfg=quick)
    sent = await env.send(["alice@example.com"])
    await env.wait_events(1, provider="new", outcome="delivered")
    [e] = await env.wait_events(1, provider="legacy")
    assert (e["outcome"], e["smtp_code"]) == ("deferred", None)
    assert "timeout" in e["smtp_response"]
    env.clock.advance(67)
    await env.wait_events(1, provider="legacy", outcome="delivered")
    assert len(copies(env.legacy, sent.marker)) == 1


async def test_drop_after_data_is_a_deferral(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("drop", stage="after_data", times=1))
    env = await make_env(legacy=legacy)
    sent = await env.send(["zed@example.com"])
    [e] = await env.wait_events(1, provider="legacy")
    assert (e["outcome"], e["smtp_code"]) == ("deferred", None)
    env.clock.advance(67)
    await env.wait_events(1, provider="legacy", outcome="delivered")
    assert len(copies(env.legacy, sent.marker)) == 1
    assert len(env.legacy.dropped_after_data) == 1


# -------------------------------------------------------------------- replies per recipient


async def test_partial_acceptance(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("defer", rcpt="r2@example.com", code=450, text="4.2.1 Mailbox busy", times=1))
    legacy.add(Rule("reject", rcpt="r3@example.com", code=550, text="5.1.1 No such user"))
    env = await make_env(legacy=legacy)
    sent = await env.send(["r1@example.com", "r2@example.com", "r3@example.com"])
    first = await env.wait_events(3, provider="legacy")
    by = {e["rcpt"]: e for e in first}
    assert (by["r1@example.com"]["outcome"], by["r1@example.com"]["smtp_code"]) == (
        "delivered", 250,
    )  # fmt: skip
    r2 = by["r2@example.com"]
    assert (r2["outcome"], r2["smtp_code"], r2["enhanced_code"]) == ("deferred", 450, "4.2.1")
    r3 = by["r3@example.com"]
    assert (r3["outcome"], r3["smtp_code"], r3["enhanced_code"]) == ("bounced", 550, "5.1.1")
    assert by["r1@example.com"]["remote_id"] == env.legacy.messages[0].queue_id
    await env.idle()

    env.clock.advance(67)
    await env.wait_events(1, provider="legacy", rcpt="r2@example.com", outcome="delivered")
    await until(lambda: env.queue_files() == [], what="spool emptied")
    got = copies(env.legacy, sent.marker)
    assert [m.rcpts for m in got] == [["r1@example.com"], ["r2@example.com"]]
    for m in got:
        assert_faithful(m, sent)
    assert len(env.events(provider="legacy", rcpt="r1@example.com")) == 1
    assert len(env.events(provider="legacy", rcpt="r3@example.com")) == 1
    [late] = env.events(provider="legacy", rcpt="r2@example.com", outcome="delivered")
    assert late["attempt"] == 2


async def test_too_many_recipients_go_at_once_in_a_new_transaction(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("defer", rcpt="r3@example.com", code=452, text="4.5.3 Too many recipients",
                    times=1))  # fmt: skip
    env = await make_env(legacy=legacy)
    sent = await env.send(["r1@example.com", "r2@example.com", "r3@example.com"])
    events = await env.wait_events(4, provider="legacy")  # no clock advance needed
    assert [(e["rcpt"], e["outcome"], e["attempt"]) for e in events][-1] == (
        "r3@example.com", "delivered", 2,
    )  # fmt: skip
    got = copies(env.legacy, sent.marker)
    assert [m.rcpts for m in got] == [["r1@example.com", "r2@example.com"], ["r3@example.com"]]


async def test_first_attempts_and_due_retries_take_turns() -> None:
    """Retries and first attempts each in time order, taken in turn while both have
    due work (a due retry first): a retry due at 990 goes before mail that arrived
    at 995, but a backlog of due retries never holds new mail behind all of it;
    arrival order among new messages; nothing before it is due."""
    clock = FakeClock(1000.0)
    s = Scheduler(config.RelaySettings(), cast(Any, None), cast(Any, None), clock=clock)
    plan = (
        PlanEntry("zed@example.com", "legacy", "zed@example.com", "primary", None, None, False),
    )

    def env(qid: str, received: float) -> Envelope:
        return Envelope(qid, "", received, SENDER, ("zed@example.com",), (), "127.0.0.1", None,
                        100, False, plan, False)  # fmt: skip

    s.add("late-retry", env("late-retry", 100.0), [StateLine(0, "deferred", 2, 999.0)])
    s.add("new-1", env("new-1", 995.0))
    s.add("retry", env("retry", 900.0), [StateLine(0, "deferred", 1, 990.0)])
    s.add("new-2", env("new-2", 996.0))
    s.add("future", env("future", 900.0), [StateLine(0, "deferred", 1, 1060.0)])
    order = []
    for _ in range(4):
        msg = await s._take("legacy")
        assert msg is not None
        order.append(msg.queue_id)
    assert order == ["retry", "new-1", "late-retry", "new-2"]
    assert s._retries["legacy"][0][1] == "future"  # not due yet
    assert not s._fresh["legacy"]


async def test_a_backlog_of_due_retries_never_holds_new_mail_behind_it() -> None:
    """1,000 retries due at once (`relay queue retry` after an outage), then mail
    arrives: each new message is taken within two picks of its arrival."""
    clock = FakeClock(1000.0)
    s = Scheduler(config.RelaySettings(), cast(Any, None), cast(Any, None), clock=clock)
    plan = (PlanEntry("zed@example.com", "new", "zed@example.com", "shadow", None, None, False),)

    def env(qid: str, received: float) -> Envelope:
        return Envelope(qid, "", received, SENDER, ("zed@example.com",), (), "127.0.0.1", None,
                        100, False, plan, False)  # fmt: skip

    for i in range(1000):
        s.add(f"old-{i:04}", env(f"old-{i:04}", 100.0 + i), [StateLine(0, "deferred", 3, 999.0)])
    taken = []
    for i in range(10):
        s.add(f"new-{i}", env(f"new-{i}", 1000.0))
        for _ in range(2):
            msg = await s._take("new")
            assert msg is not None
            taken.append(msg.queue_id)
        assert f"new-{i}" in taken[-2:]
    assert [q for q in taken if q.startswith("old")] == [f"old-{i:04}" for i in range(10)]


async def test_every_recipient_refused_and_5xx_at_mail(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("defer", stage="rcpt", code=451, times=2))
    new = Provider("new")
    new.add(Rule("reject", stage="mail", code=553, text="5.7.1 Sender rejected"))
    env = await make_env(legacy=legacy, new=new)
    sent = await env.send(["alice@example.com", "zed@example.com"])
    events = await env.wait_events(3)
    assert {(e["provider"], e["outcome"], e["smtp_code"]) for e in events} == {
        ("legacy", "deferred", 451), ("new", "bounced", 553),
    }  # fmt: skip
    env.clock.advance(67)
    await env.wait_events(2, provider="legacy", outcome="delivered")
    [m] = copies(env.legacy, sent.marker)
    assert m.rcpts == ["alice@example.com", "zed@example.com"]


# ------------------------------------------------------------------ retry schedule, expiry


async def test_retry_schedule_then_expiry(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("defer", stage="mail", code=451, text="4.7.1 Greylisted"))
    schedule, max_age = [60, 300], 1000
    env = await make_env(legacy=legacy, retry={"schedule": schedule, "max_age": max_age})
    t0 = env.clock.now()
    sent = await env.send(["zed@example.com"])
    msg = env.relay.scheduler.messages[sent.queue_id]
    [d] = msg.deliveries
    when: list[float] = []  # fake time of each attempt
    for n in range(1, 20):
        e = (await env.wait_events(n, provider="legacy"))[-1]
        when.append(env.clock.now() - t0)
        assert e["attempt"] == n
        assert (e["smtp_code"], e["enhanced_code"]) == (451, "4.7.1")
        if e["outcome"] == "expired":
            break
        assert e["outcome"] == "deferred"
        assert when[-1] < max_age
        await env.idle()
        base = schedule[min(n - 1, len(schedule) - 1)]
        gap = d.due - env.clock.now()
        assert base * 0.9 <= gap <= base * 1.1, (n, gap)
        env.clock.advance(gap - 1)  # not yet due: no attempt
        await asyncio.sleep(0.05)
        assert len(env.events(provider="legacy")) == n
        env.clock.advance(1.001)
    else:
        pytest.fail("never expired")
    assert when[-1] >= max_age  # the first attempt after max_age, not before
    assert when[-2] < max_age
    assert len(when) >= 4
    await until(lambda: env.queue_files() == [], what="expired message removed")
    assert sent.queue_id not in env.relay.scheduler.messages


async def test_connection_failures_expire_too(make_env: Factory) -> None:
    env = await make_env(start_legacy=False, retry={"schedule": [60], "max_age": 100})
    await env.send(["zed@example.com"])
    await env.wait_events(1, provider="legacy", outcome="deferred")
    env.clock.advance(67)
    await env.wait_events(2, provider="legacy")
    env.clock.advance(67)
    [e] = await env.wait_events(1, provider="legacy", outcome="expired")
    assert e["smtp_code"] is None and e["attempt"] == 3
    await until(lambda: env.queue_files() == [], what="expired message removed")


# ------------------------------------------------------------------------- extensions


async def test_8bitmime_and_smtputf8_passed_on(make_env: Factory) -> None:
    env = await make_env()
    body = "Grüße, ça va? 日本語\r\n".encode()
    eight = await env.send(["alice@example.com"], options=["BODY=8BITMIME"], body=body)
    utf8 = await env.send(
        ["alice@example.com"], sender="jörg@example.org", options=["SMTPUTF8", "BODY=8BITMIME"],
        body=body,
    )  # fmt: skip
    plain = await env.send(["alice@example.com"])
    await env.wait_events(6, outcome="delivered")
    for p in (env.legacy, env.new):
        [m] = copies(p, eight.marker)
        assert "BODY=8BITMIME" in m.mail_options and "SMTPUTF8" not in m.mail_options
        assert_faithful(m, eight)
        [m] = copies(p, utf8.marker)
        assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(m.mail_options)
        assert m.mail_from == "jörg@example.org"
        assert_faithful(m, utf8)
        [m] = copies(p, plain.marker)
        assert not {"BODY=8BITMIME", "SMTPUTF8"} & set(m.mail_options)
        assert any(o.startswith("SIZE=") for o in m.mail_options)  # SIZE is offered


@pytest.mark.parametrize(
    ("lacking", "options", "sender", "enhanced"),
    [
        ({"eight_bit_mime": False}, ["BODY=8BITMIME"], SENDER, "5.6.3"),
        # SPEC Part 2 "Corrections": SMTPUTF8 is final only for a copy that needs it
        # (here the sender), no longer for every message sent with the parameter.
        ({"smtputf8": False}, ["SMTPUTF8"], "jörg@example.org", "5.6.7"),
    ],
)
async def test_provider_lacking_extension_is_final_never_downgraded(
    make_env: Factory, lacking: dict[str, bool], options: list[str], sender: str, enhanced: str
) -> None:
    env = await make_env(new=Provider("new", **lacking))  # type: ignore[arg-type]
    sent = await env.send(
        ["alice@example.com"], sender=sender, options=options, body="é\r\n".encode()
    )
    [e] = await env.wait_events(1, provider="new")
    assert e["outcome"] == "bounced" and e["enhanced_code"] == enhanced
    assert e["smtp_code"] is not None and e["smtp_code"] >= 500
    assert e["by"] == "relay"  # the relay refused it: the report must not blame "new"
    assert env.new.messages == []
    assert not any(c.startswith("MAIL") for c in env.new.commands)  # not even tried
    await env.wait_events(1, provider="legacy", outcome="delivered")
    assert len(copies(env.legacy, sent.marker)) == 1


@pytest.mark.parametrize(
    ("lacking", "options", "body", "expect_options"),
    [
        # SPEC Part 2 "Corrections": nothing in the copy needs the extension
        ({"smtputf8": False}, ["SMTPUTF8"], b"plain\r\n", set()),
        ({"eight_bit_mime": False}, ["BODY=8BITMIME"], b"plain\r\n", set()),
        (
            {"smtputf8": False, "eight_bit_mime": False},
            ["SMTPUTF8", "BODY=8BITMIME"],
            b"plain\r\n",
            set(),
        ),
        # an ASCII header and envelope with an 8-bit body: 8BITMIME covers it
        ({"smtputf8": False}, ["SMTPUTF8"], "Grüße\r\n".encode(), {"BODY=8BITMIME"}),
    ],
)
async def test_parameter_left_out_when_nothing_needs_it(
    make_env: Factory,
    lacking: dict[str, bool],
    options: list[str],
    body: bytes,
    expect_options: set[str],
) -> None:
    env = await make_env(new=Provider("new", **lacking))  # type: ignore[arg-type]
    sent = await env.send(["alice@example.com"], options=options, body=body)
    [e] = await env.wait_events(1, provider="new")
    assert e["outcome"] == "delivered", e
    [m] = copies(env.new, sent.marker)
    assert {"SMTPUTF8", "BODY=8BITMIME"} & set(m.mail_options) == expect_options
    assert_faithful(m, sent)
    [m] = copies(env.legacy, sent.marker)  # the provider with the extensions gets them
    assert set(options) <= set(m.mail_options)


@pytest.mark.parametrize(
    ("lacking", "header", "body", "enhanced"),
    [
        ({"smtputf8": False}, "Subject: Grüße\r\n", (b"x" * 998 + b"\r\n") * 600, "5.6.7"),
        # 8-bit only at the end of a body far longer than one read chunk
        (
            {"smtputf8": False, "eight_bit_mime": False},
            "",
            (b"x" * 998 + b"\r\n") * 600 + "é\r\n".encode(),
            "5.6.3",
        ),
    ],
)
async def test_a_copy_that_needs_the_extension_is_final(
    make_env: Factory, lacking: dict[str, bool], header: str, body: bytes, enhanced: str
) -> None:
    env = await make_env(new=Provider("new", **lacking))  # type: ignore[arg-type]
    marker = env.marker()
    data = (f"X-Test-Marker: {marker}\r\n{header}\r\n").encode() + body
    await env.send(["alice@example.com"], options=["SMTPUTF8"], data=data)
    [e] = await env.wait_events(1, provider="new")
    assert (e["outcome"], e["enhanced_code"], e["by"]) == ("bounced", enhanced, "relay")
    assert not any(c.startswith("MAIL") for c in env.new.commands)
    await env.wait_events(1, provider="legacy", outcome="delivered")


def test_eight_bit_scan_finds_the_header_end_across_chunks() -> None:
    """Header and body told apart wherever the chunks split the empty line."""
    cases = [
        (b"A: b\r\n\r\n\xc3\xa9\r\n", (False, True)),
        (b"A: \xc3\xa9\r\n\r\nbody\r\n", (True, False)),
        (b"\r\n\xc3\xa9\r\n", (False, True)),  # no header at all
        (b"A: b\r\nC: \xc3\xa9\r\n", (True, False)),  # no body at all
        (b"A: b\r\n\r\nplain\r\n", (False, False)),
    ]
    for data, expected in cases:
        for cut in range(len(data) + 1):
            for second in range(cut, len(data) + 1):
                chunks = [data[:cut], data[cut:second], data[second:]]
                assert content_scan(chunks) == expected, (data, cut, second)


# ----------------------------------------------------------------- connection reuse
# (TLS, AUTH, pooling and pipelining in depth: test_provider_conn.py)


async def test_connections_are_reused(make_env: Factory) -> None:
    env = await make_env()
    sent = []
    for n in range(1, 6):
        sent.append(await env.send(["alice@example.com"]))
        await env.wait_events(2 * n, outcome="delivered")
    assert env.legacy.connections == env.new.connections == 1
    assert [m.connection for m in env.legacy.messages] == [1] * 5
    for s in sent:
        assert_faithful(copies(env.legacy, s.marker)[0], s)
    assert "QUIT" not in env.legacy.commands


async def test_a_cached_connection_gone_is_replaced_at_once(make_env: Factory) -> None:
    env = await make_env()
    await env.send(["zed@example.com"])
    await env.wait_events(1, provider="legacy", outcome="delivered")
    await env.legacy.stop()  # closes every connection, the cached one too
    await env.legacy.start()
    await env.send(["zed@example.com"])
    [_, e] = await env.wait_events(2, provider="legacy", outcome="delivered")
    assert e["attempt"] == 1
    assert env.legacy.connections == 2


async def test_a_new_connection_breaking_at_mail_defers(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("drop", stage="mail", times=1))
    env = await make_env(legacy=legacy)
    await env.send(["zed@example.com"])
    [e] = await env.wait_events(1, provider="legacy")
    assert (e["outcome"], e["smtp_code"]) == ("deferred", None)


async def test_reused_tls_session_stays_tls(make_env: Factory, server_tls: ssl.SSLContext) -> None:
    legacy = Provider("legacy", starttls=True, tls_context=server_tls)
    env = await make_env(legacy=legacy, legacy_cfg={"tls": "starttls"})
    for n in (1, 2):
        await env.send(["zed@example.com"])
        await env.wait_events(n, provider="legacy", outcome="delivered")
    assert all(e["tls"] for e in env.events(provider="legacy"))
    assert [m.tls for m in env.legacy.messages] == [True, True]
    assert env.legacy.connections == 1
    assert env.legacy.commands.count("STARTTLS") == 1


# ------------------------------------------------------------- robustness of the engine


async def test_internal_error_in_an_attempt_defers_and_retries(make_env: Factory) -> None:
    env = await make_env()
    calls = []

    async def flaky(*args: Any, **kw: Any) -> Attempt:
        calls.append(args[2])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return await send_once(*args, **kw)

    env.relay.scheduler.sender = flaky
    sent = await env.send(["zed@example.com"])
    [e] = await env.wait_events(1, provider="legacy")
    assert (e["outcome"], e["smtp_code"]) == ("deferred", None)
    env.clock.advance(67)
    await env.wait_events(1, provider="legacy", outcome="delivered")
    assert len(copies(env.legacy, sent.marker)) == 1


async def test_one_attempt_per_message_and_provider_at_a_time(make_env: Factory) -> None:
    """Two heap entries due at once for one message (e.g. `relay queue retry` twice)
    make one attempt, not a second one right after that ignores the backoff."""
    legacy = Provider("legacy")
    legacy.add(Rule("defer", stage="rcpt", code=451))
    env = await make_env(legacy=legacy)
    sent = await env.send(["zed@example.com"])
    await env.wait_events(1, provider="legacy")
    await env.idle()
    await env.relay.scheduler.retry(sent.queue_id)
    await env.relay.scheduler.retry(sent.queue_id)
    await env.wait_events(2, provider="legacy")
    await env.idle()
    await asyncio.sleep(0.1)
    assert len(env.events(provider="legacy")) == 2
    assert sum(c.startswith("MAIL") for c in env.legacy.commands) == 2
    # the connection was kept; RSET closed the refused transaction before the next MAIL
    assert env.legacy.connections == 1
    assert env.legacy.commands.index("RSET") < max(
        i for i, c in enumerate(env.legacy.commands) if c.startswith("MAIL")
    )


async def test_concurrent_attempts_of_one_message_are_serialised(make_env: Factory) -> None:
    """retry while an attempt is in flight must not send the message twice."""
    legacy = Provider("legacy")
    legacy.add(Rule("hang", stage="after_data", times=1))
    env = await make_env(legacy=legacy, legacy_cfg={"data_timeout": 0.5})
    sent = await env.send(["zed@example.com"])
    await env.legacy.wait_until(lambda: bool(env.legacy.dropped_after_data), what="hang")
    await env.relay.scheduler.retry(sent.queue_id)
    await env.wait_events(1, provider="legacy")
    env.clock.advance(67)
    await env.wait_events(1, provider="legacy", outcome="delivered")
    await env.idle()
    assert len(copies(env.legacy, sent.marker)) == 1


async def test_restart_resumes_unfinished_and_never_resends_done(
    make_env: Factory, tmp_path: Path
) -> None:
    root = tmp_path / "shared"
    clock = FakeClock()
    env = await make_env(start_legacy=False, root=root, clock=clock)
    sent = await env.send(["alice@example.com", "zed@example.com"])
    await env.wait_events(1, provider="new", outcome="delivered")
    await env.wait_events(2, provider="legacy", outcome="deferred")
    await env.idle()
    await env.relay.stop()

    await env.legacy.start()
    later = FakeClock(clock.now() + 67)
    env2 = await make_env(legacy=env.legacy, new=env.new, root=root, clock=later)
    delivered = await env2.wait_events(2, provider="legacy", outcome="delivered")
    assert {e["attempt"] for e in delivered} == {2}
    await until(lambda: env2.queue_files() == [], what="spool emptied")
    assert len(copies(env.new, sent.marker)) == 1  # done before the restart: not again
    [m] = copies(env.legacy, sent.marker)
    assert m.rcpts == ["alice@example.com", "zed@example.com"]


async def test_message_with_partial_reply_record_durable_before_log(make_env: Factory) -> None:
    """Each delivery event's state is in the spool's state file before it is logged."""
    env = await make_env(start_legacy=False)
    sent = await env.send(["alice@example.com"])
    [e] = await env.wait_events(1, provider="legacy")
    state = env.queue_dir / f"{sent.queue_id}.state"
    lines = [json.loads(x) for x in state.read_text().splitlines()]
    assert any(s["s"] == "deferred" and s["n"] == 1 for s in lines)
    assert e["outcome"] == "deferred"
