"""The report's completeness line (SPEC Part 2 "Safety net"): replays count toward it and
stay out of latency, rejection (spam) and verdict figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay.report.html import render_html
from relay.report.logs import build_report
from relay.report.text import render_text

T0 = "2026-11-25T09:00:00.000Z"


def ev(event: str, ts: str, **fields: Any) -> str:
    return json.dumps({"node": "n1", "event": event, "ts": ts, **fields})


def received(qid: str, rcpt: str, group: str = "sales") -> str:
    plan = [
        {"rcpt": rcpt, "provider": p, "delivered_to": rcpt, "role": role, "group": group,
         "mode": "dual", "pilot": True}
        for p, role in (("legacy", "primary"), ("new", "shadow"))
    ] + [{"rcpt": "", "provider": "archive", "delivered_to": "", "role": "shadow", "group": None,
          "mode": None, "pilot": True}]  # fmt: skip
    return ev("received", T0, queue_id=qid, mail_from="s@x.test", rcpts=[rcpt], plan=plan,
              forwarded=False)  # fmt: skip


def delivery(qid: str, rcpt: str, provider: str, outcome: str, latency: float = 10,
             role: str = "shadow", **kw: Any) -> str:  # fmt: skip
    code = {"delivered": 250, "expired": 451}.get(outcome, 550)
    text = kw.pop("text", f"{code} reply")
    return ev("delivery", "2026-11-25T09:00:01.000Z", queue_id=qid, rcpt=rcpt, provider=provider,
              role=role, outcome=outcome, smtp_code=code, enhanced_code=kw.pop("enhanced", None),
              smtp_response=text, attempt=1, latency_ms=latency)  # fmt: skip


def replayed(qid: str, original: str, rcpt: str) -> str:
    return ev("replayed", "2026-11-30T10:00:00.000Z", queue_id=qid, original_node="n1",
              original_queue_id=original, rcpt=rcpt, provider="new", delivered_to=rcpt,
              group="sales")  # fmt: skip


def test_replays_fill_completeness_and_nothing_else(tmp_path: Path) -> None:
    a, b, c = "a@example.com", "b@example.com", "c@example.com"
    lines = [
        received("Q1", a), delivery("Q1", a, "legacy", "delivered"),
        delivery("Q1", a, "new", "delivered", 20), delivery("Q1", "", "archive", "delivered"),
        received("Q2", b), delivery("Q2", b, "legacy", "delivered"),
        delivery("Q2", b, "new", "expired", 432_000_000),
        received("Q3", c), delivery("Q3", c, "legacy", "delivered"),
        delivery("Q3", c, "new", "expired", 432_000_000),
        # after the outage: B replayed and delivered (5 days late), C replayed and refused as spam
        replayed("R1", "Q2", b), delivery("R1", b, "new", "delivered", 999_999, role="replay"),
        replayed("R2", "Q3", c),
        delivery("R2", c, "new", "bounced", 5, role="replay", enhanced="5.7.1",
                 text="550 5.7.1 message looks like spam"),
        ev("archive_purged", "2026-12-01T00:00:00.000Z", count=3, bytes=300, reason="retention",
           before="2026-09-01T00:00:00.000Z"),
    ]  # fmt: skip
    log = tmp_path / "d.jsonl"
    log.write_text("\n".join(lines) + "\n")
    rep = build_report([log])
    assert rep.inputs.corrupt_lines == 0 and rep.inputs.orphan_events == 0
    assert rep.inputs.unknown_events == 0
    (group,) = rep.completeness
    assert (group.group, group.legacy_delivered, group.new_holds) == ("sales", 3, 2)
    assert (group.live, group.replayed) == (1, 1)
    new = rep.providers["new"]
    assert (new.planned, new.delivered, new.expired, new.bounced) == (3, 1, 2, 0)
    assert new.latency_ms.max == 20  # the replay's 999 999 ms is not a latency
    assert sum(new.rejections.values()) == 0  # nor is its spam refusal a rejection
    assert rep.totals.pairs == 3
    text = render_text(rep)
    assert f"sales: new holds 2 of 3 messages legacy delivered since {T0}: 1 live, 1 replayed" in (
        " ".join(text.split())
    )
    html = " ".join(render_html(rep).split())
    assert "<strong>sales</strong>: new holds 2 of 3 messages legacy delivered since" in html
    assert rep.to_dict()["completeness"] == [
        {"group": "sales", "legacy_delivered": 3, "new_holds": 2, "live": 1, "replayed": 1}
    ]


def test_a_replay_of_a_pair_new_already_had_is_not_counted_twice(tmp_path: Path) -> None:
    a = "a@example.com"
    lines = [
        received("Q1", a), delivery("Q1", a, "legacy", "delivered"),
        delivery("Q1", a, "new", "delivered"),
        replayed("R1", "Q1", a), delivery("R1", a, "new", "delivered", role="replay"),
        replayed("R9", "Q9", a), delivery("R9", a, "new", "delivered", role="replay"),  # unknown
    ]  # fmt: skip
    log = tmp_path / "d.jsonl"
    log.write_text("\n".join(lines) + "\n")
    (group,) = build_report([log]).completeness
    assert (group.legacy_delivered, group.new_holds, group.live, group.replayed) == (1, 1, 1, 0)


def test_no_pilot_pairs_says_so(tmp_path: Path) -> None:
    log = tmp_path / "d.jsonl"
    log.write_text("")
    assert "no pilot pairs delivered by legacy" in render_text(build_report([log]))
