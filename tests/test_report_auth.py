"""The report's By authentication section and fairness table, against the test's own
tally: a real relay judges real messages (loopback DNS), and the placement log
is written by the test as the probe would write it."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from relay.report.command import report_command
from relay.report.html import render_html
from relay.report.logs import build_report
from relay.report.model import Report
from relay.report.reasons import REASON_LABELS
from tests.harness import RelayEnv
from tests.helpers_auth import send_from
from tests.helpers_dns import LoopbackDNS
from tests.report_pages import by_id, parse, table_rows
from tests.test_auth import CASES, auth_yaml

MakeEnv = Callable[..., Awaitable[RelayEnv]]
SENT = ["aligned_pass"] * 3 + ["fail"] * 2 + ["none", "auth_no_policy", "temperror"]


def placement(ev: dict[str, Any], provider: str, verdict: dict[str, str]) -> dict[str, Any]:
    return {
        "event": "placement", "ts": ev["ts"], "node": ev["node"], "queue_id": ev["queue_id"],
        "rcpt": "Alice@example.com", "provider": provider, "delivered_to": "x", "group": "sales",
        "folder": "inbox", "detail": "INBOX", "match": "message_id", "verdict": verdict,
    }  # fmt: skip


async def test_by_authentication_and_fairness_equal_the_tally(
    relay_env: MakeEnv, auth_dns: LoopbackDNS, tmp_path: Path
) -> None:
    env = await relay_env(auth_yaml(auth_dns, timeout=1))
    for case in SENT:
        source, sender, data, _ = CASES[case]
        await send_from(source, env.port, sender, ["alice@example.com"], data)
    await env.wait_for(lambda: len(env.events("delivery")) == 2 * len(SENT), what="deliveries")
    received = env.events("received")
    tally = Counter(e["auth"]["class"] for e in received)
    assert tally == Counter(SENT)
    # the probe's view: legacy trusts the relay; new judges the relay's IP, so two
    # of the three aligned_pass copies fail DMARC and compauth there ("Fail" as M365 writes)
    lines = []
    aligned = [e for e in received if e["auth"]["class"] == "aligned_pass"]
    for i, ev in enumerate(aligned):
        lines.append(placement(ev, "legacy", {"spf": "pass", "dmarc": "pass"}))
        bad = i < 2
        lines.append(placement(ev, "new", {
            "spf": "pass", "dmarc": "fail (p=reject)" if bad else "pass",
            "compauth": "Fail" if bad else "pass", "scl": "5",
        }))  # fmt: skip
    for ev in received:  # a verdict on mail of another class never counts
        if ev["auth"]["class"] == "fail":
            lines.append(placement(ev, "new", {"spf": "fail", "dmarc": "fail"}))
    plog = tmp_path / "placement.jsonl"
    plog.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")

    rep = build_report([env.log_path], placement=[plog])
    by_class = {s.name: s for s in rep.by_auth}
    assert [s.name for s in rep.by_auth] == [
        "aligned_pass", "auth_no_policy", "none", "fail", "temperror",
    ]  # fmt: skip
    for cls, n in tally.items():
        s = by_class[cls]
        assert s.pairs == n and s.pilot_pairs == n
        for p in ("legacy", "new"):
            assert (s.providers[p].planned, s.providers[p].delivered) == (n, n)
    legacy, new = rep.fairness.rows
    assert rep.fairness.absent is None
    assert (legacy.provider, legacy.aligned_pass, legacy.any_fail, legacy.note) == (
        "legacy", 3, 0, None,
    )  # fmt: skip
    assert (new.aligned_pass, new.fails, new.any_fail) == (
        3, {"spf": 0, "dmarc": 2, "compauth": 2}, 2,
    )  # fmt: skip
    assert new.note is not None and new.note.startswith("new said dmarc=fail on 67% of the mail")
    assert "not set up to trust the relay as its inbound gateway" in new.note

    doc = json.loads(_report(env.log_path, "--format", "json", "--placement", str(plog)))
    assert [c["class"] for c in doc["by_authentication"]] == [s.name for s in rep.by_auth]
    assert doc["by_authentication"][0]["providers"]["new"]["delivered"] == 3
    assert doc["fairness"]["rows"][1]["fails"] == {"spf": 0, "dmarc": 2, "compauth": 2}
    text = _report(env.log_path, "--placement", str(plog))
    assert "By authentication (the class the relay gave the message at ingress)" in text
    assert "Fairness: the providers' own verdicts on mail the relay judged aligned_pass" in text
    assert "new said dmarc=fail on 67% of the mail the relay judged aligned_pass" in text
    _html_and_csv_equal_the_tally(rep, tally, env.log_path, plog)


def _html_and_csv_equal_the_tally(rep: Report, tally: Counter[str], log: Path, plog: Path) -> None:
    """The HTML's tables carry the text's columns and the tally; the CSV's auth_class too."""
    doc = parse(render_html(rep))
    outcomes = by_id(doc, "auth-table-outcomes")
    assert [th.all_text() for th in outcomes.find("th")] == [
        "class", "provider", "planned", "delivered", "bounced", "expired", "deleted",
        "pending", "deferrals", "rate", "1st try",
    ]  # fmt: skip
    reasons = by_id(doc, "auth-table-reasons")
    assert [th.all_text() for th in reasons.find("th")] == [
        "class",
        "provider",
        *REASON_LABELS.values(),
    ]
    assert all(set(r[2:]) == {"0"} for r in table_rows(reasons))  # nothing bounced
    rows = table_rows(outcomes)
    names = [r[0] for r in rows if r[0]]
    assert names == [s.name for s in rep.by_auth]
    cls = ""
    for r in rows:  # class, provider, planned, delivered, …
        cls = r[0] or cls
        assert (r[2], r[3]) == (str(tally[cls]), str(tally[cls])), r
    assert len(rows) == 2 * len(tally)
    fair = table_rows(by_id(doc, "fairness-table"))
    assert [r[:6] for r in fair] == [
        ["legacy", "3", "0", "0", "0", "0"],
        ["new", "3", "0", "2", "2", "2"],
    ]
    notes = [n.all_text() for n in doc.walk() if "fairness-note" in n.classes]
    assert notes == [rep.fairness.rows[1].note]
    assert notes[0].startswith("new said dmarc=fail on 67% of the mail")

    out = _report(log, "--format", "csv", "--placement", str(plog))
    got = Counter(row["auth_class"] for row in csv.DictReader(io.StringIO(out)))
    assert got == tally  # one recipient a message: a pair per message


def _report(*args: Any) -> str:
    res = CliRunner().invoke(report_command, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_without_a_placement_log_the_table_is_absent_and_says_why(tmp_path: Path) -> None:
    log = tmp_path / "d.jsonl"
    plan = [{"rcpt": "a@example.com", "provider": "legacy", "delivered_to": "a@example.com",
             "role": "primary", "group": None, "mode": None, "pilot": False}]  # fmt: skip
    base = {"event": "received", "ts": "2026-12-01T10:00:00.000Z", "node": "n",
            "message_id": None, "mail_from": "", "client_ip": "127.0.0.1", "size": 1,
            "rcpts": ["a@example.com"], "plan": plan, "forwarded": False}  # fmt: skip
    auth = {
        "spf": "pass",
        "spf_domain": "e.org",
        "dkim": [],
        "dmarc": "pass",
        "dmarc_policy": "none",
        "arc": "none",
        "from_domain": "e.org",
        "class": "aligned_pass",
    }
    log.write_text(json.dumps(base | {"queue_id": "Q1", "auth": auth}) + "\n")
    rep = build_report([log])
    assert [(s.name, s.pairs) for s in rep.by_auth] == [("aligned_pass", 1)]
    assert rep.fairness.rows == [] and rep.fairness.absent is not None
    assert "no placement log given" in rep.fairness.absent
    assert "Fairness: no table: no placement log given (--placement)" in _report(log)
    absent = by_id(parse(render_html(rep)), "fairness-absent").all_text()
    assert absent == f"No table: {rep.fairness.absent}."
    log.write_text(json.dumps(base | {"queue_id": "Q1"}) + "\n")  # auth.verify off
    rep = build_report([log])
    assert rep.by_auth == [] and "auth.verify was off" in (rep.fairness.absent or "")
    assert "By authentication: none (no received event carries a verdict" in _report(log)
    page = parse(render_html(rep))
    assert "None (no received event carries a verdict" in by_id(page, "authentication").all_text()
