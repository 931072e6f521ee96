"""The stored records: a spool written by the v1 writer (commit 4e39419) reads back and is
delivered by the current code, byte for byte; anything malformed is one RecordError."""

# ruff: noqa: F811 - the make_env fixture is imported, then named as a parameter
from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.log import DeliveryLog
from relay.queue_admin import QueueError, execute, load_scheduler
from relay.records import (
    ControlRequest,
    RecordError,
    StateLine,
    parse_control_answer,
    parse_control_request,
    parse_envelope,
    parse_state_line,
)
from relay.spool import FOOTER, MAGIC, Spool
from relay.testing import FakeClock
from tests.conftest import read_content
from tests.test_delivery import Factory, make_env, until  # noqa: F401

pytestmark = pytest.mark.timeout(30)

V1 = Path(__file__).parent / "fixtures" / "spool_v1" / "queue"
A, DSN_B, C, D, DSN_D, E, F = (
    "1A23339CD7EAD3F21039786", "1A23339CDA6565AC00DEF0A", "1A23339CDB9B3F1BF7EBF36",
    "1A23339CF142180C28F920D", "1A23339CF1FA18A7B81ACA8", "1A23339D07049FD1FE9567E",
    "1A23339D07D53035A639074",
)  # fmt: skip
SENDER = "sender@example.org"


def raw_envelope(msg: Path) -> bytes:
    data = msg.read_bytes()
    _, clen, elen, _, _ = FOOTER.unpack(data[-FOOTER.size :])
    return data[clen : clen + elen]


def copy_v1(root: Path) -> Path:
    """The v1 queue as the spool of a relay whose root is `root`."""
    spool = root / "var" / "spool"
    shutil.copytree(V1, spool / "queue")
    return spool


def test_v1_records_read_back_and_are_written_the_same() -> None:
    msgs = sorted(V1.glob("*.msg"))
    assert [m.stem for m in msgs] == [A, DSN_B, C, D, DSN_D, E, F]
    for msg in msgs:
        raw = raw_envelope(msg)
        envelope = parse_envelope(raw)
        assert envelope.to_json() == raw
        state = msg.with_suffix(".state")
        for line in state.read_bytes().splitlines() if state.exists() else []:
            parsed = parse_state_line(line, len(envelope.plan))
            assert json.dumps(parsed.to_dict(), separators=(",", ":")).encode() == line
    dsn = parse_envelope(raw_envelope(V1 / f"{DSN_D}.msg"))
    assert (dsn.dsn, dsn.dsn_for, dsn.mail_from, dsn.client_ip) == (True, D, "", None)
    f = parse_envelope(raw_envelope(V1 / f"{F}.msg"))
    assert (f.mail_from, f.options) == ("sénder@example.org", ("SMTPUTF8",))


def test_v1_spool_as_relay_queue_sees_it(tmp_path: Path) -> None:
    spool = Spool(copy_v1(tmp_path))
    settings = config.RelaySettings()
    log = DeliveryLog(tmp_path / "deliveries.jsonl", "t1")
    try:
        messages = load_scheduler(settings, spool, log).messages
    finally:
        log.close()
    states = {
        qid: [(d.provider, d.plan.rcpt, d.status, d.attempts) for d in m.deliveries]
        for qid, m in messages.items()
    }
    assert states == {
        A: [("legacy", "alice@example.com", "deferred", 1),
            ("new", "alice@example.com", "delivered", 1)],
        DSN_B: [("bounce", SENDER, "deferred", 1)],
        C: [("legacy", "zed@example.com", "deferred", 1),
            ("legacy", "ann@dev.example.com", "deferred", 1),
            ("new", "ann@dev.example.com", "delivered", 1)],
        D: [("legacy", "r1@example.com", "deferred", 1),
            ("legacy", "r3@example.com", "bounced", 1)],
        DSN_D: [("bounce", SENDER, "deferred", 1)],
        E: [("legacy", "zoe@example.com", "pending", 0)],
        F: [("legacy", "zed@example.com", "pending", 0)],
    }  # fmt: skip
    assert messages[D].deliveries[0].last == "450 4.2.1 Mailbox busy"


async def test_v1_spool_is_recovered_and_delivered(make_env: Factory, tmp_path: Path) -> None:
    """What the old relay still owed goes out, once; what it had done is not done again."""
    root = tmp_path / "relay"
    spool = Spool(copy_v1(root))
    content = {qid: read_content(spool, qid) for qid in (A, C, D, E, F, DSN_B, DSN_D)}
    due = [json.loads(x)["due"] for s in V1.glob("*.state") for x in s.read_text().splitlines()]
    env = await make_env(root=root, clock=FakeClock(max(due) + 1))
    legacy_owed = {
        A: ["alice@example.com"], C: ["zed@example.com", "ann@dev.example.com"],
        D: ["r1@example.com"], E: ["zoe@example.com"], F: ["zed@example.com"],
    }  # fmt: skip
    await env.legacy.wait_for_messages(len(legacy_owed))
    await env.bounce.wait_for_messages(2)
    await until(lambda: env.queue_files() == [], what="spool emptied")
    # each outcome is recorded, then logged: the attempt that finishes a message
    # writes its event just after the files go (README "delivery-log writes")
    await env.wait_events(8, outcome="delivered")

    got = {m.data: m for m in env.legacy.messages}
    for qid, rcpts in legacy_owed.items():
        m = got[content[qid]]  # the stored content, byte for byte
        assert m.rcpts == rcpts
        assert m.mail_from == ("sénder@example.org" if qid == F else SENDER)
    assert "SMTPUTF8" in got[content[F]].mail_options
    assert "BODY=8BITMIME" in got[content[C]].mail_options
    assert sorted(m.data for m in env.bounce.messages) == sorted((content[DSN_B], content[DSN_D]))
    assert all((m.mail_from, m.rcpts) == ("", [SENDER]) for m in env.bounce.messages)
    assert env.new.messages == []  # delivered before the restart: not again
    attempts = {(e["queue_id"], e["rcpt"]): e["attempt"] for e in env.events(outcome="delivered")}
    assert attempts == {
        (A, "alice@example.com"): 2, (C, "zed@example.com"): 2, (C, "ann@dev.example.com"): 2,
        (D, "r1@example.com"): 2, (E, "zoe@example.com"): 1, (F, "zed@example.com"): 1,
        (DSN_B, SENDER): 2, (DSN_D, SENDER): 2,
    }  # fmt: skip
    assert env.events("bounce_sent") == []  # r3's DSN was queued by the old relay


# -- malformed records --------------------------------------------------------------------

GOOD = json.loads(raw_envelope(V1 / f"{A}.msg"))
AUTH = {
    "spf": "pass", "spf_domain": "example.org", "dkim": [{"domain": "example.org",
    "result": "pass"}], "dmarc": "pass", "dmarc_policy": "reject", "arc": "none",
    "from_domain": "example.org", "class": "aligned_pass",
}  # fmt: skip


def test_an_envelope_with_a_verdict_reads_back_the_same() -> None:
    """auth.verify adds `auth` and `prepend`; an envelope without them (every spool
    written before) reads as before, with neither."""
    raw = {**GOOD, "auth": AUTH, "prepend": {"legacy": "A: 1\r\n", "new": "B: 2\r\nA: 1\r\n"}}
    env = parse_envelope(json.dumps(raw, separators=(",", ":")))
    assert env.auth is not None and env.auth.to_dict() == AUTH
    assert (env.prepended("legacy"), env.prepended("new")) == (b"A: 1\r\n", b"B: 2\r\nA: 1\r\n")
    assert json.loads(env.to_json()) == raw
    old = parse_envelope(json.dumps(GOOD))
    assert (old.auth, old.prepend, old.prepended("new")) == (None, (), b"")


def with_field(key: str, value: Any) -> dict[str, Any]:
    return {**GOOD, key: value}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


def with_plan_field(key: str, value: Any) -> dict[str, Any]:
    return with_field("plan", [{**GOOD["plan"][0], key: value}])


@pytest.mark.parametrize(
    "raw",
    [
        b"not json", b"[1, 2]", b"\xff\xfe", with_field("v", 2), without("v"),
        with_field("v", True),
        without("plan"), without("received_epoch"), without("mail_from"), without("dsn"),
        with_field("received_epoch", "yesterday"), with_field("received_epoch", math.inf),
        with_field("received_epoch", math.nan), with_field("size", -1), with_field("size", 1.5),
        with_field("size", True), with_field("rcpts", "a@example.com"), with_field("rcpts", [1]),
        with_field("client_ip", 127), with_field("dsn", 0), with_field("dsn_for", None),
        with_field("plan", {}), with_field("plan", ["x"]), with_plan_field("provider", "other"),
        with_plan_field("role", "copy"), with_plan_field("mode", "sometimes"),
        with_plan_field("pilot", "yes"), with_plan_field("group", 3),
        {k: v for k, v in GOOD.items() if k != "queue_id"},
        with_field("auth", None), with_field("auth", {**AUTH, "class": "great"}),
        with_field("auth", {**AUTH, "dkim": [{"domain": "x"}]}),
        with_field("auth", {k: v for k, v in AUTH.items() if k != "spf"}),
        with_field("prepend", {"elsewhere": "X: y\r\n"}), with_field("prepend", {"new": 1}),
        with_field("prepend", {"new": "X: \u00e9\r\n"}), with_field("prepend", []),
    ],
)  # fmt: skip
def test_malformed_envelope(raw: bytes | dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        parse_envelope(raw if isinstance(raw, bytes) else json.dumps(raw).encode())


@pytest.mark.parametrize(
    "line",
    [
        b"", b"{", b"null", b'"deferred"', b'{"s":"deferred"}', b'{"i":0}',
        b'{"i":2,"s":"deferred"}', b'{"i":-1,"s":"deferred"}', b'{"i":"0","s":"deferred"}',
        b'{"i":true,"s":"deferred"}', b'{"i":0.0,"s":"deferred"}', b'{"i":0,"s":"lost"}',
        b'{"i":0,"s":null}', b'{"i":0,"s":"deferred","n":-1}', b'{"i":0,"s":"deferred","n":"1"}',
        b'{"i":0,"s":"deferred","due":"soon"}', b'{"i":0,"s":"deferred","due":NaN}',
        b'{"i":0,"s":"deferred","due":Infinity}', b'{"i":0,"s":"deferred","due":null}',
        b'{"i":0,"s":"deferred","due":false}', b'{"i":0,"s":"deferred","r":451}',
    ],
)  # fmt: skip
def test_malformed_state_line(line: bytes) -> None:
    with pytest.raises(RecordError):
        parse_state_line(line, 2)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"i":1,"s":"deleted","n":2}', StateLine(1, "deleted", 2)),
        (b'{"i":0,"s":"pending","n":0,"due":5,"r":null}', StateLine(0, "pending", 0, 5.0)),
        (b'{"i":0,"s":"deferred","n":1,"due":7.5,"r":"451 x","later":1}',
         StateLine(0, "deferred", 1, 7.5, "451 x")),
    ],
)  # fmt: skip
def test_state_line_optional_fields(line: bytes, expected: StateLine) -> None:
    assert parse_state_line(line, 2) == expected


@pytest.mark.parametrize(
    "bad",
    [b'{"i":7,"s":"delivered","n":1}\n', b'{"i":0,"s":"gone"}\n', b'{"i":0,"s":"deferred"\n'],
    ids=["index-out-of-range", "unknown-status", "garbled"],
)
def test_a_malformed_whole_state_line_sets_the_message_aside(tmp_path: Path, bad: bytes) -> None:
    """SPEC Part 2 "Faults": a whole line that cannot be used makes the message's state
    unknown; it goes to corrupt/, the others recover (only the tail after the last LF
    is a torn append, cut and forgotten)."""
    spool = Spool(copy_v1(tmp_path))
    state = spool.queue / f"{D}.state"
    state.write_bytes(bad + state.read_bytes())
    good, bad_ids = spool.recover()
    assert bad_ids == [D]
    assert D not in {s.queue_id for s in good} and len(good) == 6
    assert sorted(p.name for p in spool.corrupt.iterdir()) == [f"{D}.msg", f"{D}.state"]


def test_state_lines_carry_a_checksum(tmp_path: Path) -> None:
    """One flipped bit in a v2 line (`"i":0` → `"i":1`, both in the plan) is caught."""
    line = StateLine(0, "delivered", 1, 12.5, "250 2.0.0 Ok").to_line()
    assert line.endswith(b"}\n") and b',"c":' in line
    assert parse_state_line(line.rstrip(b"\n"), 2) == StateLine(
        0, "delivered", 1, 12.5, "250 2.0.0 Ok"
    )
    flipped = line.replace(b'"i":0', b'"i":1')
    with pytest.raises(RecordError, match="checksum"):
        parse_state_line(flipped.rstrip(b"\n"), 2)


def test_a_malformed_envelope_is_moved_to_corrupt(tmp_path: Path) -> None:
    """A well-formed file whose envelope is not a v1 envelope is never delivered."""
    spool = Spool(copy_v1(tmp_path / "src"))
    spool.create()
    raw = raw_envelope(spool.msg_path(E))
    content = read_content(spool, E)
    incomplete = json.dumps({k: v for k, v in json.loads(raw).items() if k != "plan"}).encode()

    footer = FOOTER.pack(MAGIC, len(content), len(incomplete), zlib.crc32(content),
                         zlib.crc32(incomplete))  # fmt: skip
    spool.msg_path(E).write_bytes(content + incomplete + footer)
    good, bad = spool.recover()
    assert bad == [E] and E not in {s.queue_id for s in good}
    assert (spool.corrupt / f"{E}.msg").exists()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"op":"retry","queue_id":null,"provider":null}', ControlRequest("retry", None, None)),
        (b'{"op":"delete","queue_id":"Q","provider":"new"}', ControlRequest("delete", "Q", "new")),
        (b'{"op":"retry"}', ControlRequest("retry", None, None)),
    ],
)  # fmt: skip
def test_control_request(raw: bytes, expected: ControlRequest) -> None:
    assert parse_control_request(raw) == expected
    assert parse_control_request(expected.to_json()) == expected


async def test_control_request_for_an_unknown_provider(tmp_path: Path) -> None:
    spool = Spool(copy_v1(tmp_path))
    log = DeliveryLog(tmp_path / "deliveries.jsonl", "t1")
    try:
        sched = load_scheduler(config.RelaySettings(), spool, log)
        with pytest.raises(QueueError, match="unknown provider 'other'"):
            await execute(sched, ControlRequest("delete", A, "other"))
    finally:
        log.close()


@pytest.mark.parametrize(
    "raw", [b"{}", b'{"queue_id":"Q"}', b'{"op":1}', b'{"op":"x","provider":2}']
)
def test_malformed_control_request(raw: bytes) -> None:
    with pytest.raises(RecordError):
        parse_control_request(raw)


def test_control_answer() -> None:
    assert parse_control_answer(b'{"count":3}') == {"count": 3}
    assert parse_control_answer(b'{"error":"Q: not in the queue"}') == {
        "error": "Q: not in the queue"
    }
    for raw in (b"{}", b'{"count":-1}', b'{"count":1,"error":"x"}', b'{"error":null}'):
        with pytest.raises(RecordError):
            parse_control_answer(raw)
