"""Canaries end to end against Dovecot: the relay sends them, the probe finds them.

Two stand-in providers hand each message they accept to their own Dovecot over
LMTP (as in tests/test_probe_dovecot.py); the canary mailboxes and the pilot
mailboxes live there. The test's tally comes from Dovecot's own records (its
Sieve log says where each message was stored, its rawlog what INTERNALDATE it
gave) and the relay's delivery log, never from the probe's placement log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay import config
from relay import dovecot as dovecot_mod
from relay.app import Relay
from relay.canary.sender import CanarySender
from relay.cli import cli
from relay.dovecot import PASSWORD, Dovecot
from relay.probe.daemon import Probe
from relay.testing import Provider, ReceivedMessage
from tests.helpers_auth import key
from tests.helpers_probe import PILOTS, events, message, probe_yaml, send_all, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(90),
    pytest.mark.skipif(dovecot_mod.available() is None, reason="dovecot is not installed"),
]

SIDES = ("legacy", "new")
CANARY = {"legacy": "canary@example.com", "new": "canary@example-new.com"}
CANARY_PILOTS = PILOTS + (
    '  - {address: canary@example.com, group: "(canary)", new_address: canary@example-new.com}\n'
)
JUNK_CANARIES = 'if exists "X-Relay-Canary" { fileinto "Junk"; stop; }'
STORED = re.compile(r"lmtp\(([^)]+)\)<[^>]*><[^>]*>: Info: sieve: msgid=(<[^>]*>): .*"
                    r"stored mail into mailbox '([^']+)'")  # fmt: skip
FOLDER = {"INBOX": "inbox", "Junk": "junk"}


@dataclass
class Env:
    relay: Relay
    probe: Probe
    stores: dict[str, Dovecot]
    providers: dict[str, Provider]
    held: list[tuple[str, ReceivedMessage]] = field(default_factory=list)

    def placements(self) -> list[dict[str, Any]]:
        return events(self.probe.settings.log, "placement")

    def hold(self) -> None:
        """Keep what the providers accept from Dovecot until `release` (a late arrival)."""
        for side, p in self.providers.items():
            p.on_message = lambda m, side=side: self.held.append((side, m))

    async def release(self, side: str) -> float:
        """Hand the held messages of one side to its Dovecot; the time LMTP said stored."""
        for s, m in [h for h in self.held if h[0] == side]:
            await asyncio.to_thread(self.stores[s].deliver, m.rcpts, m.data, m.mail_from)
            self.held.remove((s, m))
        return time.time()

    async def scrape(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.probe.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        return {
            name: float(value)
            for name, value in re.findall(r"^(relay_\S+) (\S+)$", body.decode(), re.M)
        }


@pytest.fixture
async def make_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """`await make_env(CANARY_KEYS, **probe_yaml_keywords)`: relay, probe, two Dovecots."""
    monkeypatch.setenv("RELAY_TEST_IMAP_PASSWORD", PASSWORD)
    made: list[Env] = []
    stores = {side: Dovecot(name=f"canary-{side}") for side in SIDES}
    providers = {side: Provider(side) for side in SIDES}

    async def make(canary: str, **probe_kw: Any) -> Env:
        for side in SIDES:
            stores[side].start()
            stores[side].attach(providers[side])
            await providers[side].start()
        folder = tmp_path / "cfg"
        folder.mkdir()
        (folder / "canary.pem").write_bytes(key("canary.example.org").private)
        (folder / "pilot-users.yaml").write_text(CANARY_PILOTS)
        imap = {
            side: f"{{host: 127.0.0.1, port: {stores[side].imap_port}, tls: none, "
            "password_env: RELAY_TEST_IMAP_PASSWORD, timeout: 5}"
            for side in SIDES
        }
        extra = (
            "canary:\n  enabled: true\n  dkim: {domain: canary.example.org, selector: c1, "
            f"key_file: canary.pem}}\n  {canary}\n"
        )
        path = folder / "relay.yaml"
        legacy, new = providers["legacy"].port, providers["new"].port
        path.write_text(probe_yaml(legacy, new, imap, extra=extra, **probe_kw))
        cfg = config.load(path)
        relay = Relay(cfg)
        await relay.start()
        probe = Probe(cfg)
        await probe.start()
        env = Env(relay, probe, stores, providers)
        made.append(env)
        watches = [p.watch for p in probe.providers.values() if p.watch is not None]
        await wait_until(lambda: all(w.watching for w in watches), 15, "IDLE sessions up")
        return env

    try:
        yield make
    finally:
        for env in made:
            if not env.probe.stopping:
                await env.probe.stop()
            await env.relay.stop()
        for p in providers.values():
            await p.stop()
        Dovecot.close_all(list(stores.values()))


def sessions(store: Dovecot) -> dict[str, list[list[str]]]:
    """The client commands (without tags) of each IMAP session, by the login that sent them.

    Each session has its own process (Dovecot's `mpid`, in its login line and in its
    rawlog's file name), which ties a rawlog to its user.
    """
    found = re.findall(r"Login: user=<([^>]+)>.*?mpid=(\d+)", store.log())
    user_of = {pid: user for user, pid in found}
    out: dict[str, list[list[str]]] = {}
    for name, text in store.transcripts().items():
        commands = [line.split(" ", 2)[-1] for line in text.splitlines() if line.strip()]
        out.setdefault(user_of[name.split(".")[1]], []).append(commands)
    return out


def internaldates(store: Dovecot) -> dict[str, datetime]:
    """Message-ID -> the INTERNALDATE Dovecot gave it, from the server's side of the rawlog."""
    out = {}
    for p in (store.dir / "rawlog").glob("*.out"):
        text = re.sub(r"^\d+\.\d+ ", "", p.read_text(errors="replace"), flags=re.M)  # times
        for chunk in re.split(r"\n\* \d+ FETCH ", text):
            when = re.search(r'INTERNALDATE "([^"]+)"', chunk)
            mid = re.search(r"^Message-ID: (<[^>]+>)", chunk, re.M | re.I)
            if when and mid:
                out[mid.group(1)] = datetime.strptime(when.group(1), "%d-%b-%Y %H:%M:%S %z")
    return out


async def one_canary(env: Env, sender: CanarySender) -> None:
    """A canary that lands in both Dovecots only after the probe has looked for it once;
    its first-seen time is within 3 s of landing (the polls are 30 s apart, or 1 s)."""
    before = len(env.placements())
    await sender.send_one()
    looks = env.probe.state.looks
    await wait_until(
        lambda: len(looks) == 2 and not any(lk.pending for lk in looks.values())
        and env.probe.idle(),
        10, "the canary's deliveries read from the log, and looked for once",
    )  # fmt: skip
    assert len(env.placements()) == before  # not found: it has not landed
    landed = {side: await env.release(side) for side in SIDES}
    await wait_until(lambda: len(env.placements()) == before + 2, 10, "found at both")
    for e in env.placements()[before:]:
        first_seen = datetime.fromisoformat(e["ts"]).timestamp()
        assert e["canary"] is True and e["folder"] == "inbox", e
        assert -0.5 < first_seen - landed[e["provider"]] < 3, (e, landed)


async def test_idle_sees_a_canary_when_it_lands_and_after_a_reconnection(make_env: Any) -> None:
    env = await make_env("every: 3600\n  poll: 30\n  idle_renew: 0.5", delays="[30]",
                         give_up_after=60)  # fmt: skip
    sender = CanarySender(env.relay.cfg.relay.canary, env.relay.port, "node1")
    env.hold()
    await one_canary(env, sender)
    # legacy's IMAP sessions are killed: the IDLE sessions fail, are counted, reconnect
    watch = env.probe.providers["legacy"].watch
    assert watch is not None
    pids = re.findall(r"Login: user=<canary@example\.com>.*?mpid=(\d+)", env.stores["legacy"].log())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    await wait_until(lambda: not watch.watching, 10, "the IDLE sessions noticed")
    await wait_until(lambda: watch.watching, 10, "IDLE again")
    await one_canary(env, sender)
    scraped = await env.scrape()
    errors = {k: v for k, v in scraped.items() if k.startswith("relay_probe_errors_total")}
    assert errors and all('provider="legacy"' in k for k in errors), errors
    await env.probe.stop()
    for side in SIDES:
        canary = sessions(env.stores[side])[CANARY[side]]
        idle = [s for s in canary if "IDLE" in s]
        assert len(idle) >= 2  # the Inbox and Junk watched, each in its own session
        assert max(s.count("IDLE") for s in idle) > 2  # re-issued (idle_renew 0.5 s)
        assert all(s.count("DONE") == s.count("IDLE") or s[-1] == "IDLE" for s in idle)
        deleted = [s for s in canary if any(c.startswith("UID STORE") for c in s)]
        assert deleted and all("IDLE" not in s for s in deleted)


async def test_without_idle_short_polls_find_the_canary(make_env: Any) -> None:
    env = await make_env("every: 3600\n  poll: 1\n  idle: false", delays="[30]",
                         give_up_after=60)  # fmt: skip
    assert all(p.watch is None for p in env.probe.providers.values())
    env.hold()
    await one_canary(env, CanarySender(env.relay.cfg.relay.canary, env.relay.port, "node1"))
    await env.probe.stop()
    for side in SIDES:
        assert not any("IDLE" in s for s in sessions(env.stores[side])[CANARY[side]])


# --------------------------------------------------------------------------- phases

EVERY = 1.5  # seconds between canaries: one round
TIMEOUT = 4.0  # canary.timeout: not found by then, missing
READ_ONLY = {"EXAMINE", "LIST", "LOGOUT", "CAPABILITY", "UID SEARCH", "UID FETCH"}


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


class Tally:
    """Each canary's fate per provider, from the delivery log and Dovecot's Sieve log."""

    def __init__(self, env: Env):
        self.env = env

    def sent(self) -> dict[str, tuple[str, float]]:
        """Message-ID -> (queue id, received) of each canary the relay accepted."""
        return {
            ev["message_id"]: (ev["queue_id"], _epoch(ev["ts"]))
            for ev in events(self.env.relay.cfg.relay.log, "received")
            if any(e["group"] == "(canary)" for e in ev["plan"])
        }

    def stored(self) -> dict[tuple[str, str], str]:
        """(side, Message-ID) -> inbox | junk, as each Dovecot's Sieve log says."""
        return {
            (side, mid): FOLDER[box]
            for side, store in self.env.stores.items()
            for user, mid, box in STORED.findall(store.log())
            if user == CANARY[side]
        }

    def fates(self) -> dict[tuple[str, str], str]:
        """(side, Message-ID) -> inbox | junk | missing, for the canaries settled by now."""
        stored, now = self.stored(), time.time()
        out = {}
        for mid, (_, received) in self.sent().items():
            for side in SIDES:
                if (side, mid) in stored:
                    out[(side, mid)] = stored[(side, mid)]
                elif received + TIMEOUT < now - 0.5:  # past the probe's deadline, and some
                    out[(side, mid)] = "missing"
        return out

    def counters(self) -> dict[tuple[str, str], int]:
        return dict(Counter((side, fate) for (side, _), fate in self.fates().items()))

    def settled(self) -> bool:
        return len(self.fates()) == 2 * len(self.sent())


def placement_counters(scraped: dict[str, float]) -> dict[tuple[str, str], int]:
    out = {}
    for k, v in scraped.items():
        m = re.fullmatch(r'relay_canary_placement_total\{folder="(\w+)",provider="(\w+)"\}', k)
        if m and v:
            out[(m.group(2), m.group(1))] = int(v)
    return out


def last_inbox(scraped: dict[str, float], side: str) -> float:
    return scraped[f'relay_canary_last_inbox_timestamp{{provider="{side}"}}']


async def test_phases_inbox_then_junk_at_new_then_new_down(make_env: Any) -> None:
    env = await make_env(f"every: {EVERY}\n  timeout: {TIMEOUT}\n  idle_renew: 5",
                         delays="[1, 2]", give_up_after=3)  # fmt: skip
    tally = Tally(env)
    pilots = ["ann@example.com", "ben@example.com"]
    await send_all(env.relay.port, [(u, message(i, u, {})) for i, u in enumerate(pilots)])

    async def agreed() -> dict[str, float]:
        """The probe's metrics once they equal the tally (as soon as both have settled)."""
        async with asyncio.timeout(10):
            while True:
                want, scraped = tally.counters(), await env.scrape()
                if placement_counters(scraped) == want == tally.counters():
                    return scraped
                await asyncio.sleep(0.05)

    def count(side: str, fate: str) -> int:
        return tally.counters().get((side, fate), 0)

    # phase 1: every canary in the Inbox at both
    await wait_until(lambda: count("new", "inbox") >= 3 and tally.settled(), 15, "phase 1")
    m1 = await agreed()
    assert placement_counters(m1) == {("legacy", "inbox"): count("legacy", "inbox"),
                                      ("new", "inbox"): count("new", "inbox")}  # fmt: skip

    # phase 2: new's filter junks canaries; visible in the metrics within one round
    env.stores["new"].set_sieve(JUNK_CANARIES)
    await wait_until(lambda: count("new", "junk") >= 1, 15, "a canary junked at new")
    stored = time.time()
    async with asyncio.timeout(EVERY):
        while placement_counters(await env.scrape()).get(("new", "junk"), 0) < 1:
            await asyncio.sleep(0.02)
    seen = time.time()
    assert seen - stored < EVERY
    await wait_until(lambda: count("new", "junk") >= 3, 15, "phase 2")
    await wait_until(tally.settled, 10, "a quiet moment")
    m2 = await agreed()
    assert placement_counters(m2)[("new", "junk")] >= 3
    assert placement_counters(m2)[("legacy", "inbox")] > placement_counters(m1)[("legacy", "inbox")]
    assert last_inbox(m2, "new") < last_inbox(m2, "legacy")

    # phase 3: new is down (its deliveries deferred): canaries missing there within one round
    await env.providers["new"].stop()
    down = time.time()
    await wait_until(lambda: any(r > down for _, r in tally.sent().values()), 10, "a canary")
    deadline = min(r for _, r in tally.sent().values() if r > down) + TIMEOUT
    async with asyncio.timeout(TIMEOUT + EVERY + 1):
        while placement_counters(await env.scrape()).get(("new", "missing"), 0) < 1:
            await asyncio.sleep(0.02)
    assert time.time() - deadline < EVERY
    await wait_until(lambda: count("new", "missing") >= 3, 20, "phase 3")
    await env.relay.stop()  # no more canaries
    await wait_until(tally.settled, 10, "the last canaries settled")
    m3 = await agreed()
    c3 = placement_counters(m3)
    assert c3[("new", "missing")] >= 3 and ("legacy", "missing") not in c3
    assert c3[("new", "junk")] == placement_counters(m2)[("new", "junk")]  # nothing since down
    assert last_inbox(m3, "new") == last_inbox(m2, "new")
    assert last_inbox(m3, "legacy") > last_inbox(m2, "legacy")

    # each canary's arrival and placement recorded once per provider, as Dovecot filed it
    fates, sent = tally.fates(), tally.sent()
    qid_mid = {qid: mid for mid, (qid, _) in sent.items()}
    got = {(e["provider"], qid_mid[e["queue_id"]]): e for e in env.placements() if e.get("canary")}
    assert len(got) == len([e for e in env.placements() if e.get("canary")]) == 2 * len(sent)
    assert {k: e["folder"] for k, e in got.items()} == fates
    assert all((e["provider_time"] is None) == (e["folder"] == "missing") for e in got.values())

    # the report's Canaries section equals the tally
    t250 = {
        (ev["provider"], ev["queue_id"]): _epoch(ev["ts"])
        for ev in events(env.relay.cfg.relay.log, "delivery")
        if ev["outcome"] == "delivered"
    }
    res = CliRunner().invoke(cli, ["report", str(env.relay.cfg.relay.log), "--format", "json",
                                   "--placement", str(env.probe.settings.log)])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)["canaries"]
    for side in SIDES:
        mine = Counter(f for (s, _), f in fates.items() if s == side)
        dates = internaldates(env.stores[side])
        arrivals = sorted(
            dates[mid].timestamp() - t250[(side, sent[mid][0])]
            for (s, mid), f in fates.items() if s == side and f != "missing"
        )  # fmt: skip
        n = len(arrivals)
        assert report[side] == {
            "sent": len(sent), "arrived": n, "inbox": mine["inbox"], "junk": mine["junk"],
            "other": 0, "missing": mine["missing"],
            "arrival_p50_s": pytest.approx(arrivals[min(n - 1, n // 2)], abs=0.002),
            "arrival_p95_s": pytest.approx(arrivals[min(n - 1, int(0.95 * n))], abs=0.002),
            "arrival_max_s": pytest.approx(arrivals[-1], abs=0.002),
        }, side  # fmt: skip
        # about the 250 (INTERNALDATE has whole seconds; filed before the 250): no zone offset
        assert arrivals[0] > -5 and arrivals[-1] < 5
        assert m3[f'relay_canary_roundtrip_seconds_count{{provider="{side}"}}'] == n

    # nothing but the canary mailboxes was written: Dovecot's commands and counters
    await env.probe.stop()
    for side, store in env.stores.items():
        by_user = {u: [c for s in ss for c in s] for u, ss in sessions(store).items()}
        pilot_users = {u for u in by_user if u != CANARY[side]}
        assert len(pilot_users) == 2, by_user.keys()  # both pilots probed: not vacuous
        for user in pilot_users:
            verbs = {" ".join(c.split(" ", 2)[:2]) if c.startswith("UID") else c.split(" ")[0]
                     for c in by_user[user]}  # fmt: skip
            assert verbs <= READ_ONLY, (user, verbs)
        stores = [c for c in by_user[CANARY[side]] if c.startswith("UID STORE")]
        assert stores and all(
            re.fullmatch(r"UID STORE \d+ \+FLAGS\.SILENT \(\\Deleted\)", c) for c in stores
        ), stores
        counted = re.findall(r"imap\(([^)]+)\).*Disconnected:.* expunged=(\d+)", store.log())
        expunged: Counter[str] = Counter()
        for user, n in counted:
            expunged[user] += int(n)
        found = sum(1 for (s, _), f in fates.items() if s == side and f != "missing")
        assert expunged[CANARY[side]] == found
        assert all(expunged[u] == 0 for u in pilot_users)
