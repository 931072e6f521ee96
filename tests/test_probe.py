"""The placement probe without a real mail server: FakeClock and an in-memory IMAP stand-in.

The schedule of looks (each delay, give_up_after → missing, errors → unknown),
following the delivery log across rotation and restarts without probing a copy
twice, `probe: false` and `sample`, the IMAP method's search strategy and
folder resolution, verdict headers and the probe's metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.log import utc_ts
from relay.probe.config import ProbeProvider
from relay.probe.daemon import Probe
from relay.probe.follow import LogFollower
from relay.probe.imap import SEARCH_EACH_MAX, ImapSession, Wanted
from relay.probe.state import sampled
from relay.probe.verdict import auth_results, forefront, parse_verdict, spam_headers
from relay.testing import FakeClock
from tests.fake_imap import FakeServer
from tests.helpers_probe import PILOTS, events, probe_yaml, wait_until

pytestmark = pytest.mark.timeout(30)
T0 = 1_900_000_000.0  # 2030-03-17
PROVIDERS = {
    side: "{host: 127.0.0.1, port: 1, tls: none, password_env: RELAY_FAKE_PW}"
    for side in ("legacy", "new")
}


def new_address(rcpt: str) -> str:
    return rcpt.replace("@example.com", "@example-new.com")


class DeliveryLog:
    """Writes delivery-log events as the relay would, stamped by the fake clock."""

    def __init__(self, path: Path, clock: FakeClock):
        self.path = path
        self.clock = clock

    def write(self, **ev: Any) -> None:
        ev.setdefault("ts", utc_ts(datetime.fromtimestamp(self.clock.now(), UTC)))
        ev.setdefault("node", "node1")
        with open(self.path, "a") as f:
            f.write(json.dumps(ev) + "\n")

    def received(self, qid: str, rcpt: str, message_id: str | None = None, **extra: Any) -> None:
        plan = [
            {"rcpt": rcpt, "provider": "legacy", "delivered_to": rcpt, "role": "primary",
             "group": "sales", "mode": "dual", "pilot": True},
            {"rcpt": rcpt, "provider": "new", "delivered_to": new_address(rcpt), "role": "shadow",
             "group": "sales", "mode": "dual", "pilot": True},
        ]  # fmt: skip
        self.write(event="received", queue_id=qid, rcpts=[rcpt], plan=plan,
                   message_id=message_id or f"<{qid}@origin.test>", **extra)  # fmt: skip

    def delivered(self, qid: str, rcpt: str, provider: str, outcome: str = "delivered") -> None:
        to = rcpt if provider == "legacy" else new_address(rcpt)
        self.write(event="delivery", queue_id=qid, rcpt=rcpt, provider=provider,
                   delivered_to=to, group="sales", pilot=True, outcome=outcome)  # fmt: skip

    def pair(self, qid: str, rcpt: str = "ann@example.com", **extra: Any) -> None:
        self.received(qid, rcpt, **extra)
        self.delivered(qid, rcpt, "legacy")
        self.delivered(qid, rcpt, "new")


class Env:
    def __init__(self, folder: Path, clock: FakeClock, servers: dict[str, FakeServer]):
        self.folder = folder
        self.clock = clock
        self.servers = servers
        self.cfg = config.load(folder / "relay.yaml")
        self.log = DeliveryLog(self.cfg.relay.log, clock)
        self.probe: Probe | None = None

    def make_probe(self) -> Probe:
        def factory(settings: ProbeProvider, login: str, tokens: Any) -> ImapSession:
            side = "legacy" if settings.port == 1 else "new"
            return ImapSession(settings, login, tokens, client_factory=self.servers[side].client)

        return Probe(self.cfg, clock=self.clock, session_factory=factory)

    async def start(self) -> Probe:
        self.probe = self.make_probe()
        await self.probe.start()
        return self.probe

    async def advance(self, seconds: float) -> None:
        """Move the clock on; return once the rounds it made due are done."""
        assert self.probe is not None
        self.probe.ingest_available()
        self.clock.advance(seconds)
        await wait_until(self.probe.idle, 20, "rounds done")

    def placements(self) -> list[dict[str, Any]]:
        return events(self.cfg.relay.placement.log, "placement")

    def file(self, side: str, rcpt: str, folder: str, qid: str, extra: str = "") -> None:
        login = rcpt if side == "legacy" else new_address(rcpt)
        when = datetime.fromtimestamp(self.clock.now(), UTC)
        headers = f"Message-ID: <{qid}@origin.test>\nX-Relay-Trace: node1 {qid}\n{extra}"
        self.servers[side].file(login, folder, headers.rstrip("\n"), when)


def _write_cfg(folder: Path, providers: dict[str, str] = PROVIDERS, **kw: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot-users.yaml").write_text(PILOTS)
    text = probe_yaml(2601, 2602, providers, **kw)
    (folder / "relay.yaml").write_text(text)


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("RELAY_FAKE_PW", "pw")
    providers = dict(PROVIDERS)
    providers["new"] = providers["new"].replace("port: 1,", "port: 2,")
    _write_cfg(tmp_path / "cfg", providers, delays="[60, 300]", give_up_after=900)
    e = Env(tmp_path / "cfg", FakeClock(T0), {"legacy": FakeServer(), "new": FakeServer()})
    yield e
    if e.probe is not None and not e.probe.stopping:
        await e.probe.stop()


# --------------------------------------------------------------------------- the schedule


async def test_a_look_after_each_delay_then_missing_after_give_up(env: Env) -> None:
    probe = await env.start()
    env.log.pair("Q1")
    await env.advance(59)
    assert env.servers["legacy"].logins == [] and env.placements() == []  # not before 60 s
    env.file("legacy", "ann@example.com", "Junk", "Q1")
    await env.advance(1)
    assert env.servers["legacy"].logins == ["ann@example.com"]
    assert env.servers["new"].logins == ["ann@example-new.com"]
    (junk,) = env.placements()
    assert junk["provider"] == "legacy" and junk["folder"] == "junk" and junk["detail"] == "Junk"
    assert junk["looked_after_s"] == 60 and junk["match"] == "message_id"
    env.file("new", "ann@example.com", "INBOX", "Q1")
    await env.advance(240)  # the second look, at 300 s
    found = env.placements()[-1]
    assert (found["provider"], found["folder"], found["looked_after_s"]) == ("new", "inbox", 300)
    assert not probe.state.looks

    env.log.pair("Q2")  # never filed anywhere: missing at give_up_after, not before
    for step in (60, 240, 599):
        await env.advance(step)
        assert len(env.placements()) == 2
    await env.advance(1)
    missing = env.placements()[2:]
    assert {(e["provider"], e["folder"], e["looked_after_s"]) for e in missing} == {
        ("legacy", "missing", 900), ("new", "missing", 900),
    }  # fmt: skip
    assert probe.metrics.placements.labels("new", "missing")._value.get() == 1


async def test_an_outage_or_a_bad_password_gives_unknown_and_an_error_metric(env: Env) -> None:
    probe = await env.start()
    env.servers["new"].down = True
    env.servers["legacy"].password = "changed"
    env.log.pair("Q1")
    env.file("legacy", "ann@example.com", "INBOX", "Q1")
    env.file("new", "ann@example.com", "INBOX", "Q1")
    for step in (60, 240, 600):
        await env.advance(step)
    got = {e["provider"]: e for e in env.placements()}
    assert got["new"]["folder"] == "unknown" and "refused" in got["new"]["detail"]
    assert (
        got["legacy"]["folder"] == "unknown" and "Authentication failed" in got["legacy"]["detail"]
    )
    assert probe.metrics.errors.labels("new", "connect")._value.get() == 3
    assert probe.metrics.errors.labels("legacy", "login")._value.get() == 3
    # the error clears when the provider is back: found at the next look, not unknown
    env.servers["new"].down = False
    env.log.pair("Q2")
    env.file("new", "ann@example.com", "INBOX", "Q2")
    env.servers["new"].down = True
    await env.advance(60)
    env.servers["new"].down = False
    await env.advance(240)
    assert [
        e["folder"] for e in env.placements() if e["queue_id"] == "Q2" and e["provider"] == "new"
    ] == ["inbox"]


async def test_follows_rotation_and_restarts_without_probing_twice(env: Env) -> None:
    probe = await env.start()
    env.log.pair("Q1")
    env.file("legacy", "ann@example.com", "INBOX", "Q1")
    await env.advance(60)
    assert len(env.placements()) == 1  # legacy found; new still open
    log = env.cfg.relay.log
    os.rename(log, log.with_name(log.name + ".1"))  # logrotate, then the relay reopens
    env.log.pair("Q2", "ben@example.com")
    probe.ingest_available()
    assert {lk.queue_id for lk in probe.state.looks.values()} == {"Q1", "Q2"}

    await probe.stop()  # SIGTERM: the state is saved
    env.log.pair("Q3", "cid@example.com")  # written while the probe is down
    env.log.delivered("Q1", "ann@example.com", "legacy")  # a crash duplicate of a delivery
    probe = await env.start()
    assert {(lk.queue_id, lk.provider) for lk in probe.state.looks.values()} == {
        ("Q1", "new"), ("Q2", "legacy"), ("Q2", "new"), ("Q3", "legacy"), ("Q3", "new"),
    }  # fmt: skip
    for side in ("legacy", "new"):
        for qid, rcpt in (("Q1", "ann"), ("Q2", "ben"), ("Q3", "cid")):
            env.file(side, f"{rcpt}@example.com", "INBOX", qid)
    await env.advance(240)
    keys = [(e["queue_id"], e["provider"]) for e in env.placements()]
    assert sorted(keys) == sorted({(q, p) for q in ("Q1", "Q2", "Q3") for p in ("legacy", "new")})
    assert len(keys) == len(set(keys))  # nothing probed twice

    # a restart with no state file reads the delivery log from its start; the copies the
    # placement log already has are not looked for again
    await probe.stop()
    env.cfg.relay.placement.state_path.unlink()
    probe = await env.start()
    assert {lk.queue_id for lk in probe.state.looks.values()} == set()  # all in placement.log
    await probe.stop()
    assert json.loads(env.cfg.relay.placement.state_path.read_text())["version"] == 1


def test_follower_waits_for_the_writer_to_reopen_and_reads_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "d.jsonl"
    log.write_text('{"n": 1}\n{"n": 2')
    f = LogFollower(log)
    assert [e["n"] for e in f.read()] == [1]
    with open(log, "a") as fh:
        fh.write("}\n")
    assert [e["n"] for e in f.read()] == [2]
    os.rename(log, tmp_path / "d.jsonl.1")
    log.write_text("")  # created by logrotate, not yet written: keep reading the old file
    with open(tmp_path / "d.jsonl.1", "a") as fh:
        fh.write('{"n": 3}\n')
    assert [e["n"] for e in f.read()] == [3]
    with open(tmp_path / "d.jsonl.1", "a") as fh:
        fh.write('{"n": 4}\n')  # the writer's last line before it reopened
    log.write_text('{"n": 5}\n')
    assert [e["n"] for e in f.read()] == [4, 5]
    log.write_text("")  # copytruncate
    assert list(f.read()) == []
    with open(log, "a") as fh:
        fh.write('{"n": 6}\n')
    assert [e["n"] for e in f.read()] == [6]
    f2 = LogFollower(log, f.position)  # a restart at the saved position
    with open(log, "a") as fh:
        fh.write('{"n": 7}\nnot json\n')
    assert [e["n"] for e in f2.read()] == [7] and f2.corrupt_lines == 1


async def test_probe_false_and_sample(env: Env, tmp_path: Path) -> None:
    probe = await env.start()
    env.log.pair("Q1", "eve@example.com")  # `probe: false` in the pilot file
    probe.ingest_available()
    assert not probe.state.looks and probe.state.skipped == 2
    env.log.pair("Q2")
    probe.ingest_available()
    # opting out after delivery: the due looks are dropped, nothing is looked at
    pilots = env.folder / "pilot-users.yaml"
    ann = "{address: ann@example.com, group: sales"
    pilots.write_text(PILOTS.replace(ann + "}", ann + ", probe: false}"))
    os.utime(pilots, (time.time() + 5, time.time() + 5))
    await env.advance(60)
    assert not probe.state.looks and env.servers["legacy"].logins == [] and not env.placements()

    picked = [q for q in (f"Q{i}" for i in range(2000)) if sampled("node1", q, "a@x", 0.25)]
    assert 400 < len(picked) < 600  # about a quarter, and the same for both providers
    assert picked == [q for q in (f"Q{i}" for i in range(2000)) if sampled("node1", q, "A@X", 0.25)]


# --------------------------------------------------------------------------- the IMAP method


def _wanted(n: int, server: FakeServer, login: str = "u@x", folder: str = "INBOX") -> list[Wanted]:
    out = []
    for i in range(n):
        server.file(login, folder, f"Message-ID: <m{i}@o>\nX-Relay-Trace: node1 Q{i}")
        out.append(Wanted(f"k{i}", f"<m{i}@o>", f"node1 Q{i}", date(2000, 1, 1)))
    return out


def _session(server: FakeServer, **kw: Any) -> ImapSession:
    settings = ProbeProvider(host="127.0.0.1", tls="none", password_env="RELAY_FAKE_PW", **kw)
    return ImapSession(settings, "u@x", client_factory=server.client)


def test_few_due_are_searched_by_message_id_many_by_one_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_FAKE_PW", "pw")
    few = FakeServer()
    wanted = _wanted(SEARCH_EACH_MAX, few)
    with _session(few) as s:
        found = s.find(wanted)
    assert {f.match for f in found.values()} == {"message_id"} and len(found) == len(wanted)
    assert few.count("SEARCH") == SEARCH_EACH_MAX and few.count("FETCH") == SEARCH_EACH_MAX

    many = FakeServer()
    wanted = _wanted(200, many)
    many.file("u@x", "Junk", "Message-ID: <j@o>\nX-Relay-Trace: node1 QJ")
    wanted.append(Wanted("kj", "<j@o>", "node1 QJ", date(2000, 1, 1)))
    wanted.append(Wanted("gone", "<gone@o>", "node1 QG", date(2000, 1, 1)))
    with _session(many) as s:
        found = s.find(wanted)
    assert len(found) == 201 and "gone" not in found and found["kj"].folder == "junk"
    assert {f.match for f in found.values()} == {"sweep"}
    # one SINCE search and one fetch per swept folder (Inbox, Junk); no other folder to search
    assert many.count("SEARCH") == 2 and many.count("FETCH") == 2
    assert all(c != "EXAMINE" or a != "Sent" for c, a in many.commands)  # Sent is never searched


def test_a_message_id_hit_without_our_trace_is_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_FAKE_PW", "pw")
    server = FakeServer()
    server.file("u@x", "INBOX", "Message-ID: <m@o>\nX-Relay-Trace: other-node Q9")  # another copy
    server.file("u@x", "Promotions", "Message-ID: <m@o>\nX-Relay-Trace: node1 Q1")
    with _session(server) as s:
        found = s.find([Wanted("k", "<m@o>", "node1 Q1", date(2000, 1, 1))])
    assert found["k"].folder == "other" and found["k"].name == "Promotions"
    assert found["k"].match == "message_id"
    with _session(server) as s:  # without a Message-ID: by the trace header
        found = s.find([Wanted("k", None, "node1 Q1", date(2000, 1, 1))])
    assert found["k"].match == "trace" and found["k"].name == "Promotions"


@pytest.mark.parametrize(
    ("junk", "flag", "setting", "want", "source"),
    [
        ("Junk", True, "auto", ("Junk",), "SPECIAL-USE"),
        ("Junk Email", False, "auto", ("Junk Email",), "names"),  # Exchange: localised, no flag
        ("[Gmail]/Spam", True, "auto", ("[Gmail]/Spam",), "SPECIAL-USE"),
        ("Courrier indésirable", False, ("Courrier indésirable",), ("Courrier indésirable",),
         "configured"),
    ],
)  # fmt: skip
def test_junk_folders(
    monkeypatch: pytest.MonkeyPatch, junk: str, flag: bool, setting: Any, want: tuple[str, ...],
    source: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("RELAY_FAKE_PW", "pw")
    server = FakeServer()
    server.mailbox("u@x", junk=junk, junk_flag=flag)
    with _session(server, junk_folders=setting) as s:
        f = s.folders()
    assert (f.inbox, f.junk, f.junk_source, f.other) == ("INBOX", want, source, ())


def test_gmail_is_searched_with_x_gm_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_FAKE_PW", "pw")
    server = FakeServer(capabilities=(b"IMAP4REV1", b"X-GM-EXT-1"))
    wanted = _wanted(1, server)
    with _session(server) as s:
        found = s.find(wanted)
    assert found["k0"].folder == "inbox"
    assert ("X-GM-RAW", "rfc822msgid:m0@o") in server.commands
    assert server.count("SEARCH") == 0


def test_verdict_headers() -> None:
    raw = (
        b"Authentication-Results: mx.new.test; spf=pass (sender ok) smtp.mailfrom=o.test;\r\n"
        b"  dkim=pass header.d=o.test; dmarc=fail (p=reject) header.from=o.test;\r\n"
        b"  compauth=fail reason=000\r\n"
        b"Authentication-Results: relay.test; spf=fail; dkim=none\r\n"
        b"X-Forefront-Antispam-Report: CIP:127.0.0.2;CTRY:;LANG:en;SCL:5;SRV:;IPV:NLI;SFV:SPM;\r\n"
        b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=7.3 required=5.0 tests=BAYES_99\r\n\r\n"
    )
    verdict = parse_verdict(BytesHeaderParser().parsebytes(raw))
    assert verdict == {
        "spf": "pass", "dkim": "pass", "dmarc": "fail", "compauth": "fail", "scl": 5,
        "sfv": "SPM", "spam_flag": True, "spam_status": "yes", "spam_score": 7.3,
    }  # fmt: skip
    assert parse_verdict(BytesHeaderParser().parsebytes(b"Subject: x\r\n\r\n")) == {}
    assert auth_results(["mx; none"]) == {}
    assert forefront("SCL:-1;SFV:NSPM") == {"scl": -1, "sfv": "NSPM"}
    assert spam_headers("NO", "No, hits=-0.1 required=5") == {
        "spam_flag": False, "spam_status": "no", "spam_score": -0.1,
    }  # fmt: skip


# --------------------------------------------------------------------------- the process


def test_relay_probe_runs_serves_metrics_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`relay probe -c` as an operator runs it: metrics on its own port; SIGTERM → exit 0."""
    folder = tmp_path / "cfg"
    _write_cfg(folder, delays="[0.2]", give_up_after=10)  # a slow start must not skip the copy
    log = folder / "deliveries.jsonl"
    clock = FakeClock(time.time())
    DeliveryLog(log, clock).pair("Q1")  # delivered now; the IMAP port refuses: unknown
    env = {**os.environ, "RELAY_FAKE_PW": "pw"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "probe", "-c", str(folder / "relay.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 30
        placement = folder / "placement.jsonl"
        while time.monotonic() < deadline and len(events(placement, "placement")) < 2:
            time.sleep(0.05)
        assert {e["folder"] for e in events(placement, "placement")} == {"unknown"}
        state = json.loads((folder / "placement.jsonl.state").read_text())
        assert state["log"]["offset"] == log.stat().st_size
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        started = next(json.loads(x) for x in err.splitlines() if "probe started" in x)
        port = started["metrics_port"]
        assert port and "probe stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_metrics_listener(env: Env) -> None:
    probe = await env.start()
    env.servers["new"].down = True
    env.log.pair("Q1")
    env.file("legacy", "ann@example.com", "INBOX", "Q1")
    await env.advance(60)
    body = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{probe.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    )
    assert 'relay_placement_total{folder="inbox",provider="legacy"} 1.0' in body
    assert 'relay_probe_errors_total{provider="new",reason="connect"} 1.0' in body
    assert "relay_probe_lag_seconds 0.0" in body
    assert 'relay_probe_imap_commands_total{command="EXAMINE",provider="legacy"}' in body
    health = await asyncio.to_thread(
        lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{probe.metrics_port}/healthz", timeout=5
        ).read()
    )
    assert health == b"ok\n"


async def test_probe_measures_a_canary_and_counts_a_junked_one(env: Env) -> None:
    placement = env.cfg.relay.placement.model_copy(update={"sample": 0.0})
    env.cfg = replace(env.cfg, relay=env.cfg.relay.model_copy(update={"placement": placement}))
    probe = await env.start()
    env.log.pair("Q9")  # sample 0: no pilot pair is probed, canaries still are
    rcpt = "ann@example.com"
    plan = [
        {"rcpt": rcpt, "provider": side, "delivered_to": to, "role": role,
         "group": "(canary)", "mode": "dual", "pilot": True}
        for side, to, role in (("legacy", rcpt, "primary"), ("new", new_address(rcpt), "shadow"))
    ]  # fmt: skip
    env.log.write(event="received", queue_id="C1", rcpts=[rcpt], plan=plan,
                  message_id="<C1@origin.test>")  # fmt: skip
    for d in plan:
        env.log.write(event="delivery", queue_id="C1", rcpt=rcpt, provider=d["provider"],
                      delivered_to=d["delivered_to"], group="(canary)", pilot=True,
                      outcome="delivered")  # fmt: skip
    await env.advance(30)
    env.file("legacy", rcpt, "INBOX", "C1")  # INTERNALDATE 30 s after the 250
    env.file("new", rcpt, "Junk", "C1")
    await env.advance(30)
    by = {e["provider"]: e for e in env.placements()}
    assert by["legacy"]["folder"] == "inbox" and by["legacy"]["canary"] is True
    assert by["new"]["folder"] == "junk" and by["new"]["canary"] is True
    m = probe.metrics
    assert m.canary_placements.labels("new", "junk")._value.get() == 1
    assert m.canary_roundtrip.labels("legacy")._sum.get() == 30
    assert m.canary_last_inbox.labels("legacy")._value.get() == env.clock.now()
    assert m.placements.labels("legacy", "inbox")._value.get() == 0  # not a pilot figure
    assert probe.state.skipped == 2 and {e["queue_id"] for e in env.placements()} == {"C1"}


CANARY_ENTRY = (
    '  - {address: canary@example.com, group: "(canary)", new_address: canary@example-new.com}\n'
)


def _canary_pair(env: Env, qid: str, group: str | None) -> None:
    """A canary's `received` and two `delivery` events (`group` None: a log without it)."""
    rcpt = "canary@example.com"
    plan = [
        {"rcpt": rcpt, "provider": side, "delivered_to": to, "role": role,
         "group": group, "mode": "dual", "pilot": True}
        for side, to, role in (("legacy", rcpt, "primary"), ("new", new_address(rcpt), "shadow"))
    ]  # fmt: skip
    env.log.write(event="received", queue_id=qid, rcpts=[rcpt], plan=plan,
                  message_id=f"<{qid}@origin.test>")  # fmt: skip
    for d in plan:
        env.log.write(event="delivery", queue_id=qid, rcpt=rcpt, provider=d["provider"],
                      delivered_to=d["delivered_to"], group=group, pilot=True,
                      outcome="delivered")  # fmt: skip


def _add_canary_entry(env: Env) -> None:
    with open(env.folder / "pilot-users.yaml", "a") as f:
        f.write(CANARY_ENTRY)
    env.cfg = config.load(env.folder / "relay.yaml")


async def test_verified_canaries_are_deleted_in_the_canary_mailboxes_only(env: Env) -> None:
    _add_canary_entry(env)
    env.servers["legacy"].capabilities += (b"UIDPLUS",)  # new: plain EXPUNGE
    canary_logins = {"legacy": "canary@example.com", "new": "canary@example-new.com"}
    for side, login in canary_logins.items():
        env.servers[side].writable.add(login)
    probe = await env.start()
    env.log.pair("Q1")  # a pilot copy in the same rounds
    _canary_pair(env, "C1", "(canary)")
    _canary_pair(env, "C2", None)  # known as a canary by its header only
    await env.advance(30)
    for side in ("legacy", "new"):
        env.file(side, "ann@example.com", "INBOX", "Q1")
        env.file(side, "canary@example.com", "INBOX", "C1", "X-Relay-Canary: node1.1.a")
        env.file(side, "canary@example.com", "Junk", "C2", "X-Relay-Canary: node1.2.b")
    pilot_uids = {s: env.servers[s].uids(new_address("ann@example.com") if s == "new"
                  else "ann@example.com", "INBOX") for s in ("legacy", "new")}  # fmt: skip
    await env.advance(30)
    by = {(e["queue_id"], e["provider"]): e for e in env.placements()}
    assert {k: (e["folder"], e.get("canary")) for k, e in by.items()} == {
        ("Q1", "legacy"): ("inbox", None), ("Q1", "new"): ("inbox", None),
        ("C1", "legacy"): ("inbox", True), ("C1", "new"): ("inbox", True),
        ("C2", "legacy"): ("junk", True), ("C2", "new"): ("junk", True),
    }  # fmt: skip
    assert probe.metrics.canary_placements.labels("new", "junk")._value.get() == 1
    for side, login in canary_logins.items():
        server = env.servers[side]
        assert server.uids(login, "INBOX") == [] and server.uids(login, "Junk") == []
        pilot = new_address("ann@example.com") if side == "new" else "ann@example.com"
        assert server.uids(pilot, "INBOX") == pilot_uids[side]  # untouched
        assert server.writes and {who for who, _ in server.writes} == {login}
    assert env.servers["legacy"].count("UID EXPUNGE") == 2
    assert env.servers["new"].count("EXPUNGE") == 2
    assert env.servers["legacy"].count("EXPUNGE") == 0
    await env.advance(900)  # nothing is looked for again, nothing more is written
    assert len(env.placements()) == 6 and len(env.servers["new"].writes) == 6


async def test_canaries_stay_without_delete_after_verify(env: Env) -> None:
    _add_canary_entry(env)
    canary = env.cfg.relay.canary.model_copy(update={"delete_after_verify": False})
    env.cfg = replace(env.cfg, relay=env.cfg.relay.model_copy(update={"canary": canary}))
    await env.start()
    _canary_pair(env, "C1", "(canary)")
    env.file("legacy", "canary@example.com", "INBOX", "C1")
    await env.advance(60)
    assert [e["canary"] for e in env.placements() if e["provider"] == "legacy"] == [True]
    assert env.servers["legacy"].uids("canary@example.com", "INBOX") == [1]
    assert env.servers["legacy"].writes == [] and env.servers["new"].writes == []


async def test_canaries_polled_then_missing_at_their_timeout_delivered_or_not(env: Env) -> None:
    _add_canary_entry(env)
    canary = env.cfg.relay.canary.model_copy(update={"enabled": True, "poll": 20, "timeout": 120})
    env.cfg = replace(env.cfg, relay=env.cfg.relay.model_copy(update={"canary": canary}))
    for side, login in (("legacy", "canary@example.com"), ("new", "canary@example-new.com")):
        env.servers[side].writable.add(login)
    probe = await env.start()  # delays [60, 300], give_up_after 900: the pilots' schedule
    idle = [t for t in asyncio.all_tasks() if t.get_name().startswith("probe-idle-")]
    await wait_until(lambda: all(t.done() for t in idle), 10, "IDLE looked for")
    assert len(idle) == 2 and all(t.exception() is None for t in idle)
    assert all(s.logins == [login] for s, login in zip(
        env.servers.values(), ("canary@example.com", "canary@example-new.com"), strict=True
    ))  # one session each: no IDLE on the fake server, so polls only  # fmt: skip
    _canary_pair(env, "C1", "(canary)")
    rcpt, plan = "canary@example.com", {"legacy": "canary@example.com",
                                        "new": "canary@example-new.com"}  # fmt: skip
    env.log.write(event="received", queue_id="C2", rcpts=[rcpt], message_id="<C2@origin.test>",
                  plan=[{"rcpt": rcpt, "provider": p, "delivered_to": to, "group": "(canary)",
                         "pilot": True} for p, to in plan.items()])  # fmt: skip
    env.log.write(event="delivery", queue_id="C2", rcpt=rcpt, provider="legacy",
                  delivered_to=rcpt, group="(canary)", pilot=True, outcome="delivered")  # fmt: skip
    env.log.write(event="delivery", queue_id="C2", rcpt=rcpt, provider="new",
                  delivered_to=plan["new"], group="(canary)", pilot=True,
                  outcome="deferred")  # fmt: skip  # new is down: never delivered
    await env.advance(0)  # read, and looked for at once: not there yet
    await env.advance(10)
    env.file("legacy", rcpt, "INBOX", "C1")
    env.file("legacy", rcpt, "Junk", "C2")
    await env.advance(9)
    assert env.placements() == []  # the next poll is at 20 s
    await env.advance(1)
    by = {(e["queue_id"], e["provider"]): e for e in env.placements()}
    assert {k: (e["folder"], e["looked_after_s"]) for k, e in by.items()} == {
        ("C1", "legacy"): ("inbox", 20), ("C2", "legacy"): ("junk", 20),
    }  # found by a poll, long before the first delay (60 s)  # fmt: skip
    for step in (20, 20, 20, 20, 19):  # polls at 40, 60 (a delay), 80, 100: nor missing
        await env.advance(step)
    assert len(env.placements()) == 2
    await env.advance(1)  # canary.timeout, not give_up_after: missing
    by = {(e["queue_id"], e["provider"]): e for e in env.placements()}
    assert {k: (e["folder"], e["detail"]) for k, e in by.items() if k[1] == "new"} == {
        ("C1", "new"): ("missing", None), ("C2", "new"): ("missing", "not delivered"),
    }  # fmt: skip
    assert by[("C2", "new")]["looked_after_s"] == 120
    assert probe.metrics.canary_placements.labels("new", "missing")._value.get() == 2
    assert not probe.state.looks
    logins = env.servers["new"].logins
    assert logins.count("canary@example-new.com") == 1 + 7  # IDLE check; looks at 0..120 s


def test_the_fake_server_refuses_a_deletion_outside_the_canary_mailboxes() -> None:
    server = FakeServer(writable={"canary@example.com"})
    server.file("ann@example.com", "INBOX", "Message-ID: <Q1@origin.test>\nX-Relay-Trace: n Q1")
    settings = ProbeProvider(host="127.0.0.1", port=1, tls="none", password_env="RELAY_NO_PW")
    server.password = ""
    with ImapSession(settings, "ann@example.com", client_factory=server.client) as s:
        found = s.find([Wanted("k", "<Q1@origin.test>", "n Q1", date(2000, 1, 1))])["k"]
        assert found.uid == 1 and found.uidvalidity == server.uidvalidity
        with pytest.raises(AssertionError, match=r"SELECT in ann@example\.com"):
            s.delete([found])
    assert server.uids("ann@example.com", "INBOX") == [1]
    assert server.writes == [("ann@example.com", "SELECT")]


# --------------------------------------------------------------------------- configuration


def test_placement_config_errors_and_the_commands_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from relay.cli import cli

    folder = tmp_path / "cfg"
    bad = {
        "legacy": "{host: 127.0.0.1, auth: password}",
        "new": "{host: 127.0.0.1, auth: xoauth2, oauth: {kind: google_service_account}}",
    }
    _write_cfg(folder, bad)
    res = CliRunner().invoke(cli, ["check", "-c", str(folder / "relay.yaml")])
    assert res.exit_code == 1
    assert ": placement.providers.legacy.password_env: needed with auth: password" in res.output
    assert ": placement.providers.new.oauth.key_file: needed with kind: google_service_account" in (
        res.output
    )
    _write_cfg(folder, {"other": "{host: 127.0.0.1}"})
    res = CliRunner().invoke(cli, ["check", "-c", str(folder / "relay.yaml")])
    assert "placement.providers: unknown provider other; expected legacy or new" in res.output

    _write_cfg(folder)
    monkeypatch.delenv("RELAY_FAKE_PW", raising=False)
    res = CliRunner().invoke(cli, ["probe", "-c", str(folder / "relay.yaml")])
    assert res.exit_code == 1
    assert (
        "placement.providers.legacy.password_env: environment variable RELAY_FAKE_PW" in res.output
    )
    text = (folder / "relay.yaml").read_text().replace("enabled: true", "enabled: false")
    (folder / "relay.yaml").write_text(text)
    res = CliRunner().invoke(cli, ["probe", "-c", str(folder / "relay.yaml")])
    assert res.exit_code == 1 and "placement.enabled: false; nothing to probe" in res.output
    cfg = config.load(folder / "relay.yaml")
    assert cfg.relay.placement.looks() == (0.4, 1.2, 2.5)
    assert cfg.relay.placement.log == (folder / "placement.jsonl").resolve()


def test_user_template_is_checked() -> None:
    with pytest.raises(ValueError, match="not a template"):
        ProbeProvider(user="{mailbox}@example.com")
    p = ProbeProvider(user="{local}+probe@{domain}")
    assert p.login_for("Ann@Example.COM") == "Ann+probe@example.com"
    assert (
        ProbeProvider(user="probe@example.com").login_for("ann@example.com") == "probe@example.com"
    )
