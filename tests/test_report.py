"""`relay report`: figures computed from delivery logs the tests write themselves.

Every expected figure is computed here from the outcomes and latencies the test
chose, never copied from the report's own output.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.report.command import report_command
from relay.report.csv import CSV_COLUMNS, write_csv
from relay.report.figures import load_thresholds, nearest_rank
from relay.report.inputs import parse_bound
from relay.report.json import render_json
from relay.report.logs import build_report
from relay.report.model import DIVERGENCE_KINDS, JOINED, MODES, ReportError, Thresholds
from relay.report.reasons import REASONS, classify_reason
from relay.report.text import render_text

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    t = T0 + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- log writer


@dataclass
class Rcpt:
    """One original recipient and how the relay planned it (SPEC "Routing")."""

    addr: str
    kind: str = "nonpilot"  # nonpilot | dual | new-only | legacy-only
    group: str | None = None

    def plan(self, forwarded: bool) -> list[dict[str, Any]]:
        local, _, domain = self.addr.partition("@")
        pilot = self.kind != "nonpilot"
        mode = None if not pilot else ("dual" if self.kind == "dual" else self.kind)
        new_addr = f"{local}@{domain.replace('example.com', 'example-new.com')}"

        def entry(provider: str, to: str, role: str) -> dict[str, Any]:
            return {
                "rcpt": self.addr,
                "provider": provider,
                "delivered_to": to,
                "role": role,
                "group": self.group,
                "mode": mode,
                "pilot": pilot,
            }

        if forwarded:
            return [entry("new", new_addr, "shadow")] if self.kind in ("dual", "new-only") else []
        if self.kind == "nonpilot" or self.kind == "legacy-only":
            return [entry("legacy", self.addr, "primary")]
        if self.kind == "new-only":
            return [entry("new", new_addr, "primary")]
        return [entry("legacy", self.addr, "primary"), entry("new", new_addr, "shadow")]


@dataclass
class Log:
    node: str
    lines: list[str] = field(default_factory=list)
    plans: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def emit(self, **ev: Any) -> dict[str, Any]:
        self.lines.append(json.dumps(ev))
        return ev

    def received(
        self,
        qid: str,
        at: float,
        rcpts: list[Rcpt],
        *,
        forwarded: bool = False,
        mail_from: str = "sender@outside.example.org",
    ) -> None:
        plan = [e for r in rcpts for e in r.plan(forwarded)]
        self.plans[qid] = plan
        self.emit(
            event="received",
            ts=ts(at),
            node=self.node,
            queue_id=qid,
            message_id=f"<{qid}@outside.example.org>",
            mail_from=mail_from,
            client_ip="192.0.2.7",
            size=1234,
            rcpts=[r.addr for r in rcpts],
            plan=plan,
            forwarded=forwarded,
        )
        for r in rcpts:
            if forwarded and not r.plan(True):
                self.emit(
                    event="discarded",
                    ts=ts(at),
                    node=self.node,
                    queue_id=qid,
                    rcpt=r.addr,
                    reason="forwarded copy of a non-pilot recipient",
                )

    def delivery(
        self,
        qid: str,
        at: float,
        rcpt: str,
        provider: str,
        outcome: str,
        *,
        attempt: int = 1,
        latency_ms: float | None = None,
        code: int | None = None,
        enhanced: str | None = None,
        response: str | None = None,
    ) -> None:
        entry = next(e for e in self.plans[qid] if e["rcpt"] == rcpt and e["provider"] == provider)
        if code is None:
            code, enhanced, response = {
                "delivered": (250, "2.0.0", "250 2.0.0 Ok: queued as R1"),
                "deferred": (451, "4.3.0", "451 4.3.0 Try again later"),
                "bounced": (550, "5.1.1", "550 5.1.1 User unknown"),
                "expired": (421, "4.4.2", "421 4.4.2 Connection timed out"),
            }[outcome]
        self.emit(
            event="delivery",
            ts=ts(at),
            node=self.node,
            queue_id=qid,
            rcpt=rcpt,
            provider=provider,
            delivered_to=entry["delivered_to"],
            role=entry["role"],
            group=entry["group"],
            mode=entry["mode"],
            pilot=entry["pilot"],
            outcome=outcome,
            smtp_code=code,
            enhanced_code=enhanced,
            smtp_response=response,
            attempt=attempt,
            latency_ms=latency_ms if latency_ms is not None else 100,
            tls="TLSv1.3",
            remote_id="R1" if outcome == "delivered" else None,
        )

    def bounce_sent(self, qid: str, at: float, rcpt: str) -> None:
        self.emit(
            event="bounce_sent",
            ts=ts(at),
            node=self.node,
            queue_id=qid,
            rcpt=rcpt,
            dsn_queue_id=f"{qid}B",
        )

    def deleted(self, qid: str, at: float, rcpt: str, provider: str | None) -> None:
        self.emit(
            event="deleted",
            ts=ts(at),
            node=self.node,
            queue_id=qid,
            rcpt=rcpt,
            provider=provider,
        )

    def rejected(self, at: float) -> None:
        self.emit(
            event="rejected",
            ts=ts(at),
            node=self.node,
            client_ip="198.51.100.9",
            stage="rcpt",
            smtp_code=550,
            enhanced_code="5.7.1",
            reason="Relaying denied",
        )

    def write(self, path: Path, *, gz: bool = False, tail: str = "") -> Path:
        data = ("\n".join(self.lines) + "\n" if self.lines else "") + tail
        if gz:
            path.write_bytes(gzip.compress(data.encode()))
        else:
            path.write_text(data)
        return path


def p(values: list[float], pct: int) -> float:
    """Nearest rank, written independently: value at rank ceil(p/100*n) of the sorted list."""
    s = sorted(values)
    return s[math.ceil(pct / 100 * len(s)) - 1]


# --------------------------------------------------------------------------- a realistic day


@dataclass
class Truth:
    """What the test decided happened, per (message, rcpt, provider)."""

    outcomes: dict[tuple[str, str, str], str] = field(default_factory=dict)
    latency: dict[tuple[str, str, str], float] = field(default_factory=dict)
    attempts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    deferrals: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    group: dict[tuple[str, str], str] = field(default_factory=dict)
    pilot: dict[tuple[str, str], bool] = field(default_factory=dict)


USERS = [
    Rcpt("alice@example.com", "dual", "sales"),
    Rcpt("amir@example.com", "dual", "sales"),
    Rcpt("bob@example.com", "new-only", "support"),
    Rcpt("sue@example.com", "dual", "support"),
    Rcpt("dave@example.com", "legacy-only", "support"),
    Rcpt("zoe@example.com"),
    Rcpt("yann@example.com"),
    Rcpt("xavier@example.com"),
]


def make_day(log: Log, n_messages: int = 120, seed: int = 7) -> Truth:
    """Messages with 1-3 recipients; every planned delivery gets a chosen fate."""
    rng = random.Random(seed)
    truth = Truth()
    for m in range(n_messages):
        qid = f"Q{m:05d}"
        at = m * 60.0
        rcpts = rng.sample(USERS, rng.randint(1, 3))
        log.received(qid, at, rcpts)
        for r in rcpts:
            truth.group[(qid, r.addr)] = r.group or "(non-pilot)"
            truth.pilot[(qid, r.addr)] = r.kind != "nonpilot"
            for e in r.plan(False):
                prov = e["provider"]
                k = (qid, r.addr, prov)
                fate = rng.choices(
                    ["delivered", "retry", "bounced", "expired", "pending"], [70, 15, 7, 3, 5]
                )[0]
                attempt = 1
                t = at + 1
                if fate in ("retry", "pending", "expired"):
                    n = rng.randint(1, 3)
                    for _ in range(n):
                        log.delivery(qid, t, r.addr, prov, "deferred", attempt=attempt)
                        truth.deferrals[k] += 1
                        attempt += 1
                        t += 60
                if fate == "pending":
                    truth.outcomes[k] = "pending"
                    truth.attempts[k] = attempt - 1
                    continue
                outcome = "delivered" if fate == "retry" else fate
                lat = float(rng.randint(50, 5000) + (t - at - 1) * 1000)
                log.delivery(qid, t, r.addr, prov, outcome, attempt=attempt, latency_ms=lat)
                truth.outcomes[k] = outcome
                truth.attempts[k] = attempt
                truth.latency[k] = lat
                if outcome in ("bounced", "expired") and e["role"] == "primary":
                    log.bounce_sent(qid, t + 1, r.addr)
    return truth


def expected(truth: Truth, provider: str, keep: Any = lambda qid, rcpt: True) -> dict[str, Any]:
    ks = [k for k in truth.outcomes if k[2] == provider and keep(k[0], k[1])]
    c = Counter(truth.outcomes[k] for k in ks)
    lats = [truth.latency[k] for k in ks if truth.outcomes[k] == "delivered"]
    first = sum(1 for k in ks if truth.outcomes[k] == "delivered" and truth.attempts[k] == 1)
    return {
        "planned": len(ks),
        "delivered": c["delivered"],
        "bounced": c["bounced"],
        "expired": c["expired"],
        "pending": c["pending"],
        "deferrals": sum(truth.deferrals[k] for k in ks),
        "delivery_rate": round(c["delivered"] / len(ks), 4) if ks else None,
        "first_attempt_success": round(first / len(ks), 4) if ks else None,
        "latency": (len(lats), p(lats, 50), p(lats, 95), max(lats)) if lats else (0,),
    }


def actual(ps: Any) -> dict[str, Any]:
    lat = ps.latency_ms
    return {
        "planned": ps.planned,
        "delivered": ps.delivered,
        "bounced": ps.bounced,
        "expired": ps.expired,
        "pending": ps.pending,
        "deferrals": ps.deferrals,
        "delivery_rate": ps.delivery_rate,
        "first_attempt_success": ps.first_attempt_success,
        "latency": (lat.count, lat.p50, lat.p95, lat.max) if lat.count else (0,),
    }


@pytest.fixture
def day(tmp_path: Path) -> tuple[Path, Truth]:
    log = Log("mx1")
    truth = make_day(log)
    return log.write(tmp_path / "deliveries.jsonl"), truth


# --------------------------------------------------------------------------- figures


def test_provider_group_and_user_figures(day: tuple[Path, Truth]) -> None:
    path, truth = day
    rep = build_report([path])
    for prov in ("legacy", "new"):
        assert actual(rep.providers[prov]) == expected(truth, prov)
    groups = {g.name: g for g in rep.groups}
    assert set(groups) == set(truth.group.values())
    for name, g in groups.items():
        assert g.pairs == sum(1 for v in truth.group.values() if v == name)
        for prov in ("legacy", "new"):
            exp = expected(truth, prov, lambda q, r, name=name: truth.group[(q, r)] == name)
            assert actual(g.providers[prov]) == exp, (name, prov)
    users = {u.name: u for u in rep.users}
    assert set(users) == {u.addr for u in USERS if u.kind != "nonpilot"}
    for name, u in users.items():
        for prov in ("legacy", "new"):
            assert actual(u.providers[prov]) == expected(
                truth, prov, lambda q, r, name=name: r == name
            )
    assert rep.totals.pairs == len(truth.group)
    assert rep.totals.messages == 120
    assert rep.totals.pilot_pairs == sum(truth.pilot.values())
    assert rep.inputs.corrupt_lines == rep.inputs.orphan_events == 0
    # every failure was "550 5.1.1 User unknown"
    assert rep.providers["new"].rejections["unknown_user"] == rep.providers["new"].bounced
    assert sum(rep.providers["legacy"].deferral_reasons.values()) == sum(
        n for k, n in truth.deferrals.items() if k[2] == "legacy"
    )


def test_divergences_with_both_replies(tmp_path: Path) -> None:
    log = Log("mx1")
    alice, sue = USERS[0], USERS[3]
    log.received("Q1", 0, [alice, sue])
    log.delivery("Q1", 1, alice.addr, "legacy", "delivered", latency_ms=300)
    spam = "550 5.7.1 Message rejected as spam by Content Filtering"
    log.delivery("Q1", 1, alice.addr, "new", "bounced", code=550, enhanced="5.7.1", response=spam)
    log.delivery("Q1", 1, sue.addr, "legacy", "delivered")
    log.delivery("Q1", 1, sue.addr, "new", "delivered")
    log.received("Q2", 10, [sue])
    log.delivery("Q2", 11, sue.addr, "legacy", "expired")
    log.bounce_sent("Q2", 12, sue.addr)
    log.delivery("Q2", 11, sue.addr, "new", "delivered")
    # both refused: not a divergence; forwarded copy refused by new: not a divergence
    log.received("Q3", 20, [alice])
    log.delivery("Q3", 21, alice.addr, "legacy", "bounced")
    log.bounce_sent("Q3", 22, alice.addr)
    log.delivery("Q3", 21, alice.addr, "new", "bounced")
    log.received("Q4", 30, [alice, USERS[5]], forwarded=True)
    log.delivery("Q4", 31, alice.addr, "new", "bounced", code=550, enhanced="5.7.1", response=spam)
    rep = build_report([log.write(tmp_path / "d.jsonl")])
    assert [(d.queue_id, d.rcpt, d.refused_by) for d in rep.divergences] == [
        ("Q1", alice.addr, "new"),
        ("Q2", sue.addr, "legacy"),
    ]
    d = rep.divergences[0]
    assert (d.node, d.group, d.received) == ("mx1", "sales", ts(0))
    assert (d.legacy.outcome, d.legacy.smtp_code, d.legacy.latency_ms) == ("delivered", 250, 300)
    assert (d.new.outcome, d.new.smtp_code, d.new.enhanced_code) == ("bounced", 550, "5.7.1")
    assert d.new.smtp_response == spam and d.new.reason == "spam_content"
    assert rep.providers["new"].rejections["spam_content"] == 2
    assert rep.totals.forwarded_pairs == 2 and rep.totals.discarded_pairs == 1
    assert rep.totals.bounces_sent == 2
    assert rep.inputs.open_messages == 0
    text = render_text(rep)
    assert "Message rejected as spam" in text and "refused by legacy" in text


# --------------------------------------------------------------------------- verdicts


def pilot_group(log: Log, n: int, *, new_fail: int = 0, extra_ms: int = 0, start: int = 0) -> None:
    """n dual pairs of group sales: legacy delivers all at 1000 ms, new fails `new_fail`."""
    alice = USERS[0]
    for i in range(n):
        qid = f"S{start + i:04d}"
        log.received(qid, start + i, [alice])
        log.delivery(qid, start + i + 1, alice.addr, "legacy", "delivered", latency_ms=1000)
        if i < new_fail:
            log.delivery(qid, start + i + 1, alice.addr, "new", "bounced")
        else:
            lat = 1000 + extra_ms
            log.delivery(qid, start + i + 1, alice.addr, "new", "delivered", latency_ms=lat)


def test_verdict_ready_not_ready_insufficient(tmp_path: Path) -> None:
    log = Log("mx1")
    pilot_group(log, 30, extra_ms=120)
    rep = build_report([log.write(tmp_path / "a.jsonl")])
    v = rep.verdicts
    assert [(x.group, x.verdict) for x in v] == [("sales", "ready")]
    assert v[0].reason == (
        "new delivered 100 % of what legacy delivered, p95 +120 ms, 0 divergences → ready"
    )
    # report_version 2: a verdict's figures are its group's comparison
    c = rep.group_comparison("sales")
    assert (c.compared_pairs, c.p95_increase_ms, c.against_new) == (30, 120, 0)

    log = Log("mx1")
    pilot_group(log, 30, new_fail=2)
    rep = build_report([log.write(tmp_path / "b.jsonl")])
    v, c = rep.verdicts[0], rep.group_comparison("sales")
    assert v.verdict == "not ready"
    assert c.delivery_ratio == round(28 / 30, 4) and c.divergences["new_refused"] == 2
    # SPEC Part 2: the divergence threshold is a rate (max_divergence_rate, 0.005)
    assert "2 divergences in 30 compared pairs (6.67 %, maximum 0.5 %)" in v.reason
    assert v.reason.endswith("→ not ready")

    log = Log("mx1")
    pilot_group(log, 5)
    v = build_report([log.write(tmp_path / "c.jsonl")]).verdicts[0]
    assert v.verdict == "insufficient data"
    assert v.reason == "5 compared pairs (minimum 20) → insufficient data"


def test_thresholds_file_changes_verdict(tmp_path: Path) -> None:
    log = Log("mx1")
    pilot_group(log, 30, new_fail=1, extra_ms=90_000)
    path = log.write(tmp_path / "d.jsonl")
    v = build_report([path]).verdicts[0]
    assert v.verdict == "not ready" and "(maximum +60,000 ms)" in v.reason
    th = tmp_path / "th.yaml"
    th.write_text(
        "max_divergence_rate: 0.05\nmin_delivery_ratio: 0.9\nmax_p95_increase_ms: 100000\n"
    )
    loose = load_thresholds(th)
    assert loose.min_pairs == Thresholds().min_pairs == 20
    assert build_report([path], thresholds=loose).verdicts[0].verdict == "ready"
    res = CliRunner().invoke(
        report_command, [str(path), "--format", "json", "--thresholds", str(th)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["verdicts"][0]["verdict"] == "ready"

    th.write_text("max_divergence_rate: 0.05\nmax_latency: 3\n")
    with pytest.raises(ReportError, match="max_latency: unknown key"):
        load_thresholds(th)
    res = CliRunner().invoke(report_command, [str(path), "--thresholds", str(th)])
    assert res.exit_code == 2 and "max_latency: unknown key" in res.output
    th.write_text("min_pairs: many\n")
    with pytest.raises(ReportError, match="min_pairs"):
        load_thresholds(th)
    th.write_text("max_divergences: 1\n")  # report_version 1's count: says what replaced it
    with pytest.raises(ReportError, match="max_divergences: replaced by max_divergence_rate"):
        load_thresholds(th)


def test_forwarding_mode_verdict_counts_legacy_as_delivered(tmp_path: Path) -> None:
    """Forwarded copies: only the new shadow is observed; no divergences, but a verdict."""
    log = Log("mx1")
    alice = USERS[0]
    for i in range(25):
        log.received(f"F{i}", i, [alice, USERS[6]], forwarded=True)
        outcome = "bounced" if i < 2 else "delivered"
        log.delivery(f"F{i}", i + 1, alice.addr, "new", outcome, latency_ms=400)
    rep = build_report([log.write(tmp_path / "f.jsonl")])
    assert rep.divergences == []
    assert rep.totals.discarded_pairs == 25 and rep.totals.forwarded_pairs == 50
    assert rep.providers["legacy"].planned == 0 and rep.providers["new"].bounced == 2
    v, c = rep.verdicts[0], rep.group_comparison("sales")
    delivered = (c.providers["legacy"].delivered, c.providers["new"].delivered)
    assert (v.group, c.compared_pairs, *delivered) == ("sales", 25, 25, 23)
    assert v.verdict == "not ready" and c.delivery_ratio == 0.92 and c.against_new == 0
    assert "new delivered 92 % of what legacy delivered (minimum 99 %), p95 n/a" in v.reason


# --------------------------------------------------------------------------- input handling


def test_two_nodes_merge_keyed_by_node_and_queue_id(tmp_path: Path) -> None:
    a, b = Log("mx1"), Log("mx2")
    zoe = USERS[5]
    for log, lat in ((a, 100), (b, 300)):
        log.received("SAME", 0, [zoe])  # the same queue id on two nodes: two messages
        log.delivery("SAME", 1, zoe.addr, "legacy", "delivered", latency_ms=lat)
    b.received("B2", 5, [zoe])
    b.delivery("B2", 6, zoe.addr, "legacy", "bounced")
    b.bounce_sent("B2", 7, zoe.addr)
    rep = build_report([a.write(tmp_path / "a.jsonl"), b.write(tmp_path / "b.jsonl")])
    leg = rep.providers["legacy"]
    assert (rep.totals.messages, leg.planned, leg.delivered, leg.bounced) == (3, 3, 2, 1)
    assert (leg.latency_ms.p50, leg.latency_ms.max) == (100, 300)


def test_events_before_their_received_across_files(tmp_path: Path) -> None:
    """A rotated file given after the current one: deliveries read before `received`."""
    log = Log("mx1")
    zoe = USERS[5]
    log.received("Q1", 0, [zoe])
    old = log.write(tmp_path / "deliveries.jsonl.1")
    log.lines.clear()
    log.delivery("Q1", 1, zoe.addr, "legacy", "deferred")
    log.delivery("Q1", 61, zoe.addr, "legacy", "delivered", attempt=2, latency_ms=61_000)
    new = log.write(tmp_path / "other-name.jsonl")  # not recognised as the same rotation
    orphan = Log("mx1")
    ev = {"event": "delivery", "ts": ts(3), "node": "mx1", "queue_id": "NOPE", "rcpt": zoe.addr}
    orphan.lines.append(json.dumps({**ev, "provider": "legacy", "outcome": "delivered"}))
    rep = build_report([new, old, orphan.write(tmp_path / "x.jsonl")])
    leg = rep.providers["legacy"]
    assert (leg.delivered, leg.deferrals, leg.first_attempt_success) == (1, 1, 0.0)
    assert leg.latency_ms.max == 61_000
    assert rep.inputs.orphan_events == 1


def test_crash_duplicate_delivered_counts_once(tmp_path: Path) -> None:
    log = Log("mx1")
    alice = USERS[0]
    log.received("Q1", 0, [alice])
    log.delivery("Q1", 1, alice.addr, "legacy", "delivered", latency_ms=800)
    log.delivery("Q1", 2, alice.addr, "new", "deferred")
    log.delivery("Q1", 5, alice.addr, "new", "delivered", attempt=2, latency_ms=5000)
    # crash before the spool noted it: the same deliveries happen again
    log.delivery("Q1", 30, alice.addr, "legacy", "delivered", latency_ms=30_000)
    log.delivery("Q1", 31, alice.addr, "new", "delivered", attempt=3, latency_ms=31_000)
    # a duplicate while the message is still open (new side not final yet)
    log.received("Q2", 40, [alice])
    log.delivery("Q2", 41, alice.addr, "legacy", "delivered", latency_ms=700)
    log.delivery("Q2", 41, alice.addr, "new", "deferred")
    log.delivery("Q2", 50, alice.addr, "legacy", "delivered", latency_ms=9000)
    log.delivery("Q2", 101, alice.addr, "new", "delivered", attempt=2, latency_ms=61_000)
    rep = build_report([log.write(tmp_path / "d.jsonl")])
    leg, new = rep.providers["legacy"], rep.providers["new"]
    assert (leg.planned, leg.delivered, leg.latency_ms.max, leg.latency_ms.p50) == (2, 2, 800, 700)
    assert (new.planned, new.delivered, new.latency_ms.max, new.deferrals) == (2, 2, 61_000, 2)
    assert (new.first_attempt_success, leg.first_attempt_success) == (0.0, 1.0)
    assert rep.inputs.duplicate_deliveries == 3
    assert rep.inputs.orphan_events == rep.inputs.late_events == 0


def test_corrupt_truncated_and_empty(tmp_path: Path) -> None:
    log = Log("mx1")
    zoe = USERS[5]
    log.received("Q1", 0, [zoe])
    log.lines.append("{not json")
    log.lines.append(json.dumps({"event": "delivery", "ts": ts(1), "node": "mx1"}))  # no qid
    log.lines.append("")  # a blank line is not counted
    log.lines.append(json.dumps([1, 2]))
    log.delivery("Q1", 1, zoe.addr, "legacy", "delivered")
    tail = '{"event": "delivery", "ts": "2026-11-25T09:00:0'  # truncated last line
    path = log.write(tmp_path / "d.jsonl", tail=tail)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rep = build_report([path, empty])
    assert rep.inputs.corrupt_lines == 4
    assert rep.providers["legacy"].delivered == 1
    assert "corrupt lines 4" in render_text(rep)
    rep = build_report([empty])
    assert (rep.totals.pairs, rep.inputs.lines, rep.verdicts) == (0, 0, [])
    assert "relay report" in render_text(rep) and json.loads(render_json(rep))


def test_gzip_by_magic_and_rotated_set(tmp_path: Path) -> None:
    log = Log("mx1")
    zoe = USERS[5]
    log.received("Q1", 0, [zoe])
    oldest = log.write(tmp_path / "deliveries.jsonl.2.gz", gz=True)
    log.lines.clear()
    log.delivery("Q1", 1, zoe.addr, "legacy", "deferred")
    log.received("Q2", 2, [zoe])
    middle = log.write(tmp_path / "deliveries.jsonl.1", gz=True)  # gzip without .gz
    log.lines.clear()
    log.delivery("Q1", 61, zoe.addr, "legacy", "delivered", attempt=2)
    log.delivery("Q2", 62, zoe.addr, "legacy", "delivered")
    current = log.write(tmp_path / "deliveries.jsonl")
    rep = build_report([current, middle, oldest])
    assert rep.providers["legacy"].delivered == 2 and rep.providers["legacy"].deferrals == 1
    assert rep.inputs.orphan_events == 0 and rep.inputs.corrupt_lines == 0
    # a truncated gzip stream: what was readable counts, the damage is reported
    data = oldest.read_bytes()
    broken = tmp_path / "broken.gz"
    broken.write_bytes(data[: len(data) - 6])
    rep = build_report([broken])
    assert rep.inputs.corrupt_lines == 1 and rep.inputs.errors


def test_late_bounce_and_dsn_keep_message_open_until_logged(tmp_path: Path) -> None:
    log = Log("mx1")
    zoe = USERS[5]
    log.received("Q1", 0, [zoe], mail_from="")  # null sender: no DSN expected
    log.delivery("Q1", 1, zoe.addr, "legacy", "bounced")
    log.received("Q2", 0, [zoe])
    log.delivery("Q2", 1, zoe.addr, "legacy", "bounced")  # DSN not yet logged
    rep = build_report([log.write(tmp_path / "d.jsonl")])
    assert rep.inputs.open_messages == 1
    assert rep.providers["legacy"].bounced == 2 and rep.totals.bounces_sent == 0
    # the DSN itself is a message of its own (no `received` logged), delivered through the
    # "bounce" route: neither corrupt nor orphan, and not compared
    log.bounce_sent("Q2", 2, zoe.addr)
    dsn = {"event": "delivery", "ts": ts(3), "node": "mx1", "queue_id": "Q2B", "rcpt": "s@x.org"}
    log.lines.append(json.dumps({**dsn, "provider": "bounce", "outcome": "delivered"}))
    rep = build_report([log.write(tmp_path / "d.jsonl")])
    assert (rep.inputs.open_messages, rep.totals.bounces_sent) == (0, 1)
    assert rep.inputs.other_provider_events == 1
    assert rep.inputs.corrupt_lines == rep.inputs.orphan_events == 0


def test_message_mixing_forwarded_and_direct_recipients(tmp_path: Path) -> None:
    """forwarded is per message: a dual pair in it is still compared, the copy is not."""
    log = Log("mx1")
    alice, sue = USERS[0], USERS[3]
    log.received("M1", 0, [alice], forwarded=True)
    entry = log.plans["M1"]
    log.plans["M1"] = entry + sue.plan(False)
    ev = json.loads(log.lines[-1])
    ev["rcpts"].append(sue.addr)
    ev["plan"] = log.plans["M1"]
    log.lines[-1] = json.dumps(ev)
    log.delivery("M1", 1, alice.addr, "new", "bounced")
    log.delivery("M1", 1, sue.addr, "legacy", "delivered")
    log.delivery("M1", 1, sue.addr, "new", "bounced")
    rep = build_report([log.write(tmp_path / "m.jsonl")])
    assert [(d.rcpt, d.refused_by) for d in rep.divergences] == [(sue.addr, "new")]
    assert rep.totals.forwarded_pairs == 1
    rows = list(csv.DictReader(io.StringIO(_csv(tmp_path / "m.jsonl"))))
    assert {r["rcpt"]: r["forwarded"] for r in rows} == {alice.addr: "true", sue.addr: "false"}


def _csv(path: Path) -> str:
    out = io.StringIO()
    write_csv([path], out)
    return out.getvalue()


def test_deleted_counts_as_final(tmp_path: Path) -> None:
    log = Log("mx1")
    sue = USERS[3]
    log.received("Q1", 0, [sue])
    log.delivery("Q1", 1, sue.addr, "legacy", "delivered")
    log.delivery("Q1", 1, sue.addr, "new", "deferred")
    log.deleted("Q1", 100, sue.addr, "new")
    log.rejected(3)
    log.received("Q2", 5, [sue])
    log.delivery("Q2", 6, sue.addr, "new", "deferred")
    log.deleted("Q2", 100, sue.addr, None)  # `relay queue delete ID` without --provider
    rep = build_report([log.write(tmp_path / "d.jsonl")])
    new, leg = rep.providers["new"], rep.providers["legacy"]
    assert (new.planned, new.deleted, new.pending, new.delivery_rate) == (2, 2, 0, 0.0)
    assert (leg.planned, leg.deleted, leg.delivered) == (2, 1, 1)
    assert rep.inputs.open_messages == 0 and rep.totals.relay_rejections == 1


# --------------------------------------------------------------------------- filters


def test_since_until_group_filters(day: tuple[Path, Truth]) -> None:
    path, truth = day
    # message m is received at T0 + m minutes: 09:00 .. 10:59
    since, until = "2026-11-25T09:30:00Z", "2026-11-25T10:00:00+00:00"
    rep = build_report([path], since=since, until=until)
    assert rep.totals.messages == 30
    lo, hi = 30, 60

    def in_window(qid: str, rcpt: str) -> bool:
        return lo <= int(qid[1:]) < hi

    assert actual(rep.providers["legacy"]) == expected(truth, "legacy", in_window)
    assert rep.filters == {
        "since": "2026-11-25T09:30:00.000Z",
        "until": "2026-11-25T10:00:00.000Z",
        "group": None,
    }
    # a plain date: until means the end of that day (exclusive)
    assert build_report([path], until="2026-11-25").totals.messages == 120
    assert build_report([path], until="2026-11-24").totals.messages == 0
    assert build_report([path], since="2026-11-26").totals.messages == 0
    rep = build_report([path], group="sales")
    assert {g.name for g in rep.groups} == {"sales"}
    assert rep.totals.pairs == sum(1 for g in truth.group.values() if g == "sales")
    exp = expected(truth, "new", lambda q, r: truth.group[(q, r)] == "sales")
    assert actual(rep.providers["new"]) == exp


def test_parse_bound() -> None:
    assert parse_bound("2026-11-25") == datetime(2026, 11, 25, tzinfo=UTC)
    assert parse_bound("2026-11-25", end=True) == datetime(2026, 11, 26, tzinfo=UTC)
    assert parse_bound("2026-11-25T10:00:00+01:00") == datetime(2026, 11, 25, 9, tzinfo=UTC)
    assert parse_bound("2026-11-25T10:00:00", end=True) == datetime(2026, 11, 25, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_bound("yesterday")


# --------------------------------------------------------------------------- formats


def test_csv_one_row_per_pair_streamed(day: tuple[Path, Truth], tmp_path: Path) -> None:
    path, truth = day
    out = io.StringIO()
    write_csv([path], out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(truth.group)
    for row in rows:
        for prov in ("legacy", "new"):
            k = (row["queue_id"], row["rcpt"], prov)
            assert row[f"{prov}_outcome"] == truth.outcomes.get(k, "")
            if truth.outcomes.get(k) == "delivered":
                assert float(row[f"{prov}_latency_ms"]) == truth.latency[k]
    # rows are written as messages close: an open message comes last
    log = Log("mx1")
    zoe = USERS[5]
    log.received("OPEN", 0, [zoe])
    log.received("DONE", 1, [zoe])
    log.delivery("DONE", 2, zoe.addr, "legacy", "delivered")
    res = CliRunner().invoke(
        report_command,
        [str(log.write(tmp_path / "o.jsonl")), "--format", "csv", "-o", str(tmp_path / "o.csv")],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "o.csv").open(newline="")))
    assert [(r["queue_id"], r["legacy_outcome"]) for r in rows] == [
        ("DONE", "delivered"),
        ("OPEN", "pending"),
    ]


JSON_KEYS = {
    "report_version",
    "inputs",
    "filters",
    "thresholds",
    "labels",  # report_version 2 (SPEC Part 2, "Report for a real pilot")
    "tz",
    "pseudonymized",
    "totals",
    "comparison",
    "providers",
    "groups",
    "users",
    "divergences",
    "divergence_groups",
    "verdicts",
    "by_authentication",  # SPEC Part 2 "Judging fairly"
    "fairness",
    "completeness",  # SPEC Part 2 "Safety net": per group, live and replayed
}
COMPARISON_KEYS = {
    "pilot_pairs",
    "joined",
    "joined_by_mode",
    "compared_pairs",
    "providers",
    "delivery_ratio",
    "p95_increase_ms",
    "cutover_pairs",
    "judged_pairs",
    "divergences",
    "divergence_rate",
    "pending_pairs",
    "pending_ratio",
}
PROVIDER_KEYS = {
    "planned",
    "delivered",
    "bounced",
    "expired",
    "deleted",
    "pending",
    "deferrals",
    "delivery_rate",
    "first_attempt_success",
    "latency_ms",
    "rejections",
    "deferral_reasons",
}


def test_json_keys_are_stable(day: tuple[Path, Truth]) -> None:
    path, _ = day
    doc = json.loads(render_json(build_report([path])))
    assert set(doc) == JSON_KEYS and doc["report_version"] == 2
    assert set(doc["inputs"]) == {
        "files",
        "lines",
        "events",
        "corrupt_lines",
        "orphan_events",
        "late_events",
        "duplicate_deliveries",
        "duplicate_received",
        "unmatched_events",
        "unknown_events",
        "other_provider_events",
        "open_messages",
        "errors",
    }
    assert set(doc["totals"]) == {
        "messages",
        "pairs",
        "pilot_pairs",
        "forwarded_pairs",
        "discarded_pairs",
        "bounces_sent",
        "relay_rejections",
        "first_received",
        "last_received",
    }
    assert set(doc["filters"]) == {"since", "until", "group"}
    assert set(doc["thresholds"]) == set(Thresholds.model_fields)
    assert set(doc["providers"]) == {"legacy", "new"}
    for ps in doc["providers"].values():
        assert set(ps) == PROVIDER_KEYS
        assert set(ps["latency_ms"]) == {"count", "p50", "p95", "max"}
        assert list(ps["rejections"]) == list(REASONS) == list(ps["deferral_reasons"])
    assert set(doc["groups"][0]) == {"group", "pairs", "pilot_pairs", "providers", "comparison"}
    assert set(doc["users"][0]) == {
        "user", "group", "pairs", "pilot_pairs", "providers", "comparison"
    }  # fmt: skip
    for cmp in (doc["comparison"], doc["groups"][0]["comparison"], doc["users"][0]["comparison"]):
        assert set(cmp) == COMPARISON_KEYS
        assert list(cmp["joined"]) == list(JOINED)
        assert list(cmp["joined_by_mode"]) == list(MODES)
        assert list(cmp["divergences"]) == list(DIVERGENCE_KINDS)
        for side in cmp["providers"].values():
            assert set(side) == {"delivered", "refused", "delivery_rate", "latency_ms"}
    assert set(doc["verdicts"][0]) == {"group", "verdict", "reason", "failed"}
    div = doc["divergences"][0]
    assert set(div) == {
        "node",
        "queue_id",
        "received",
        "rcpt",
        "group",
        "kind",
        "refused_by",
        "legacy",
        "new",
    }
    assert set(doc["divergence_groups"][0]) == {
        "kind", "reason", "smtp_code", "enhanced_code", "reply", "count", "users", "groups",
        "first_received", "last_received", "examples",
    }  # fmt: skip
    assert set(div["new"]) == {
        "ts",
        "outcome",
        "smtp_code",
        "enhanced_code",
        "smtp_response",
        "latency_ms",
        "attempt",
        "deferrals",
        "reason",
    }


def test_text_fits_100_columns_and_matches_json(day: tuple[Path, Truth]) -> None:
    path, _ = day
    rep = build_report([path])
    text = render_text(rep)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "\x1b[" not in text
    flat = " ".join(text.split())
    assert rep.verdicts
    for v in rep.verdicts:
        assert " ".join(v.reason.split()) in flat
    for g in rep.groups:
        assert g.name in text


# --------------------------------------------------------------------------- command


def test_command_exit_codes_and_output(day: tuple[Path, Truth], tmp_path: Path) -> None:
    path, _ = day
    runner = CliRunner()
    res = runner.invoke(report_command, [str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and f"{tmp_path / 'nope.jsonl'}: file not found" in res.output
    res = runner.invoke(report_command, [])
    assert res.exit_code == 2
    res = runner.invoke(report_command, [str(path), "--format", "html"])
    assert res.exit_code == 0 and res.output.startswith("<!DOCTYPE html>")
    res = runner.invoke(report_command, [str(path), "--since", "soon"])
    assert res.exit_code == 2
    res = runner.invoke(report_command, [str(path)])
    assert res.exit_code == 0 and "Readiness" in res.output
    out = tmp_path / "r.txt"
    res = runner.invoke(report_command, [str(path), "--group", "sales", "-o", str(out)])
    assert res.exit_code == 0 and res.output == ""
    assert "sales" in out.read_text() and "(non-pilot)" not in out.read_text()
    out = tmp_path / "r.json"
    res = runner.invoke(report_command, [str(path), "--format", "json", "-o", str(out)])
    assert res.exit_code == 0
    assert json.loads(out.read_text()) == json.loads(render_json(build_report([path])))


# --------------------------------------------------------------------------- reasons & ranks


@pytest.mark.parametrize(
    ("enhanced", "reply", "reason"),
    [
        ("5.7.1", "550 5.7.1 Message rejected as spam by Content Filtering", "spam_content"),
        ("5.7.1", "554 5.7.1 Client host blocked using Spamhaus", "spam_content"),
        ("5.7.1", "550 5.7.1 Rejected for policy reasons", "spam_content"),
        ("5.7.26", "550 5.7.26 This mail is unauthenticated", "auth_policy"),
        ("5.7.1", "550 5.7.1 Email rejected per DMARC policy", "auth_policy"),
        (None, "550 SPF check failed", "auth_policy"),
        ("5.1.1", "550 5.1.1 The account you tried to reach does not exist", "unknown_user"),
        (None, "550 5.1.10 RESOLVER.ADR.RecipientNotFound", "unknown_user"),
        ("5.3.4", "552 5.3.4 Message size exceeds fixed limit", "size"),
        (None, "552 Message too large", "size"),
        ("4.7.28", "421 4.7.28 Unusual rate of unsolicited mail", "rate_limit"),
        ("4.7.0", "421 4.7.0 Too many connections, slow down", "rate_limit"),
        ("5.7.1", "550 5.7.1 Relaying denied", "other"),
        (None, None, "other"),
    ],
)
def test_reason_classes(enhanced: str | None, reply: str | None, reason: str) -> None:
    assert classify_reason(enhanced, reply) == reason


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=50), st.sampled_from([1, 50, 95, 100]))
def test_nearest_rank(values: list[int], pct: int) -> None:
    s = sorted(values)
    got = nearest_rank(s, pct)
    # the smallest value with at least pct % of the values at or below it
    assert got == min(v for v in s if sum(1 for x in s if x <= v) * 100 >= pct * len(s))


# --------------------------------------------------------------------------- docs


def test_docs_json_example_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/report.md shows the exact JSON of the fixture log (keys and values)."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    docs = (root / "docs" / "report.md").read_text()
    block = docs.split("<!-- json-example -->\n```json\n", 1)[1].split("\n```", 1)[0]
    res = CliRunner().invoke(
        report_command,
        [
            "tests/fixtures/report/sample.jsonl",
            "--thresholds",
            "tests/fixtures/report/thresholds.yaml",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(block) == json.loads(res.output)


_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
_event = st.fixed_dictionaries(
    {},
    optional={
        "event": st.sampled_from(["received", "delivery", "deleted", "bounce_sent", "discarded"])
        | _value,
        "ts": st.just(ts(0)) | _value,
        "node": st.just("mx1") | _value,
        "queue_id": st.just("Q1") | _value,
        "rcpt": st.just("a@example.com") | _value,
        "provider": st.sampled_from(["legacy", "new"]) | _value,
        "outcome": st.sampled_from(["delivered", "deferred", "bounced"]) | _value,
        "plan": st.just([{"rcpt": "a@example.com", "provider": "new", "pilot": True}]) | _value,
        "rcpts": _value,
        "smtp_response": _value,
        "enhanced_code": _value,
        "latency_ms": _value,
        "attempt": _value,
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_event, max_size=8))
def test_malformed_events_never_crash(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    rep = build_report([path])
    assert rep.inputs.lines == len(events)
    render_text(rep)
    render_json(rep)
