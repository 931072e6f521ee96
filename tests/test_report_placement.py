"""`relay report --placement`: the Placement section in every format, and the verdict's two
placement thresholds, from hand-written delivery and placement logs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.report.command import report_command
from relay.report.logs import build_report
from relay.report.model import Thresholds
from relay.report.placement import attach_placement

TS = "2030-03-17T10:00:00.000Z"


def _delivery_log(path: Path, n: int, group: str = "sales") -> None:
    lines = []
    for i in range(n):
        rcpt = f"u{i % 3}@example.com"
        plan = [
            {"rcpt": rcpt, "provider": p, "delivered_to": rcpt, "role": r, "group": group,
             "mode": "dual", "pilot": True}
            for p, r in (("legacy", "primary"), ("new", "shadow"))
        ]  # fmt: skip
        lines.append({"event": "received", "ts": TS, "node": "n1", "queue_id": f"Q{i}",
                      "message_id": f"<m{i}@o>", "mail_from": "s@o", "client_ip": "127.0.0.1",
                      "size": 10, "rcpts": [rcpt], "plan": plan, "forwarded": False})  # fmt: skip
        for p in ("legacy", "new"):
            lines.append({
                "event": "delivery", "ts": TS, "node": "n1", "queue_id": f"Q{i}", "rcpt": rcpt,
                "provider": p, "delivered_to": rcpt, "role": "primary", "group": group,
                "mode": "dual", "pilot": True, "outcome": "delivered", "smtp_code": 250,
                "enhanced_code": "2.0.0", "smtp_response": "ok", "attempt": 1, "latency_ms": 100,
                "tls": None, "remote_id": None,
            })  # fmt: skip
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))


def _placement(i: int, provider: str, folder: str, **extra: Any) -> dict[str, Any]:
    ev = {"event": "placement", "ts": TS, "node": "n1", "queue_id": f"Q{i}",
          "rcpt": f"u{i % 3}@example.com", "provider": provider,
          "delivered_to": f"u{i % 3}@example.com", "group": "sales", "folder": folder,
          "detail": {"inbox": "INBOX", "junk": "Junk", "other": "Promotions"}.get(folder),
          "match": "message_id", "provider_time": TS, "looked_after_s": 120,
          "verdict": {"spf": "pass"}, "received": TS}  # fmt: skip
    ev.update(extra)
    return ev


def _placement_log(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Path, Path]:
    """30 pairs: legacy files all in the Inbox; new junks 3 (10 %), loses one, one unknown."""
    d, p = tmp_path / "deliveries.jsonl", tmp_path / "placement.jsonl"
    _delivery_log(d, 30)
    events = []
    for i in range(30):
        events.append(_placement(i, "legacy", "inbox"))
        new = "junk" if i < 3 else "missing" if i == 3 else "unknown" if i == 4 else "inbox"
        detail = {"missing": None, "unknown": "connect refused"}
        extra = {"detail": detail[new]} if new in detail else {}
        events.append(_placement(i, "new", new, **extra))
    events.append(_placement(0, "new", "unknown", ts="2030-03-17T11:00:00.000Z"))  # a duplicate
    _placement_log(p, events)
    return d, p


def test_figures_divergences_and_a_verdict_not_ready_because_of_placement(
    logs: tuple[Path, Path],
) -> None:
    d, p = logs
    rep = build_report([d])
    assert rep.verdicts[0].verdict == "ready"  # by delivery alone
    attach_placement(rep, [p])
    pl = rep.placement
    assert pl is not None and pl.duplicates == 1 and pl.corrupt_lines == 1
    new = pl.providers["new"]
    assert (new.probed, new.inbox, new.junk, new.missing, new.unknown) == (30, 25, 3, 1, 1)
    assert new.junk_rate == round(3 / 29, 4)  # junk / (probed - unknown)
    assert pl.providers["legacy"].junk_rate == 0
    assert [(x.queue_id, x.junked_by, x.legacy.folder, x.new.folder) for x in pl.divergences] == [
        ("Q0", "new", "inbox", "junk"), ("Q1", "new", "inbox", "junk"),
        ("Q2", "new", "inbox", "junk"), ("Q3", "new", "inbox", "missing"),
    ]  # fmt: skip
    assert {u.name for u in pl.users} == {"u0@example.com", "u1@example.com", "u2@example.com"}
    (v,) = rep.verdicts
    assert v.verdict == "not ready"
    assert "placement: new junked 10.3 % of 29 probed pairs, legacy 0 %" in v.reason
    assert v.reason.endswith("maximum +2) → not ready")


def test_verdict_thresholds_insufficient_data_and_authenticated_mail(
    logs: tuple[Path, Path], tmp_path: Path
) -> None:
    d, p = logs
    rep = attach_placement(build_report([d], thresholds=Thresholds(min_probed_pairs=30)), [p])
    assert rep.verdicts[0].verdict == "insufficient data"
    assert "placement: insufficient data (29 probed pairs, minimum 30)" in rep.verdicts[0].reason
    rep = attach_placement(
        build_report([d], thresholds=Thresholds(max_junk_rate_increase=0.2)), [p]
    )
    assert rep.verdicts[0].verdict == "ready"
    # with the relay's verdicts, only authenticated mail counts: the junked copies were not
    events = [json.loads(x) for x in p.read_text().splitlines()[:-1]]
    for e in events:
        n = int(e["queue_id"][1:])
        e["auth_class"] = "fail" if n < 3 else "aligned_pass"
    _placement_log(p, events)
    rep = attach_placement(build_report([d], thresholds=Thresholds(min_probed_pairs=20)), [p])
    (pv,) = rep.placement.verdicts if rep.placement else []
    assert pv.authenticated_only and pv.probed_pairs == 26 and pv.new_junk_rate == 0
    assert rep.verdicts[0].verdict == "ready"
    # and with no placement at all for a group: insufficient data, never "ready" by default
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rep = attach_placement(build_report([d]), [empty])
    assert rep.verdicts[0].verdict == "insufficient data"
    assert "placement: insufficient data (0 probed pairs" in rep.verdicts[0].reason


def test_every_format_carries_the_section(logs: tuple[Path, Path]) -> None:
    d, p = logs
    run = CliRunner()
    text = run.invoke(report_command, [str(d), "--placement", str(p)])
    assert text.exit_code == 0, text.output
    out = text.output
    assert "Placement per provider" in out and "Placement per group" in out
    assert "Placement per pilot user" in out
    assert "Placement divergences: 4" in out and "junked by new" in out
    assert "new    junk (Junk) after 120 s; verdict spf=pass" in out
    assert "placement thresholds: min_probed_pairs 20, max_junk_rate_increase 0.02" in out
    # verdicts first (SPEC Part 2 "Report for a real pilot"), placement with the comparison
    assert out.index("Readiness") < out.index("Placement per provider") < out.index("Per provider")

    doc = json.loads(
        run.invoke(report_command, [str(d), "--placement", str(p), "--format", "json"]).output
    )
    assert doc["thresholds"]["min_probed_pairs"] == 20
    assert doc["thresholds"]["max_junk_rate_increase"] == 0.02
    placement = doc["placement"]
    assert set(placement) == {"inputs", "providers", "groups", "users", "divergences", "verdicts"}
    assert placement["providers"]["new"]["junk"] == 3 and len(placement["divergences"]) == 4
    assert placement["divergences"][0]["legacy"]["folder"] == "inbox"
    assert placement["divergences"][0]["new"]["verdict"] == {"spf": "pass"}
    assert "placement" not in json.loads(
        run.invoke(report_command, [str(d), "--format", "json"]).output
    )

    rows = list(csv.DictReader(io.StringIO(
        run.invoke(report_command, [str(d), "--placement", str(p), "--format", "csv"]).output
    )))  # fmt: skip
    by_q = {r["queue_id"]: r for r in rows}
    assert (by_q["Q0"]["legacy_folder"], by_q["Q0"]["new_folder"]) == ("inbox", "junk")
    assert by_q["Q0"]["placement_divergence"] == "junked by new"
    assert by_q["Q10"]["placement_divergence"] == "" and by_q["Q4"]["new_folder"] == "unknown"

    html = run.invoke(report_command, [str(d), "--placement", str(p), "--format", "html"]).output
    assert 'id="placement"' in html and 'id="chart-placement-legacy"' in html
    assert 'id="chart-placement-new"' in html and 'id="placement-divergence-table"' in html
    assert "min_probed_pairs 20" in html
    assert (
        html.index('id="readiness"') < html.index('id="placement"') < html.index('id="providers"')
    )
    assert 'id="placement"' not in run.invoke(report_command, [str(d), "--format", "html"]).output

    missing = run.invoke(report_command, [str(d), "--placement", "nope.jsonl"])
    assert missing.exit_code == 2 and "nope.jsonl: file not found" in missing.output


def test_filters_apply_to_placement(logs: tuple[Path, Path]) -> None:
    d, p = logs
    rep = attach_placement(build_report([d], group="support"), [p], group="support")
    assert rep.placement is not None and rep.placement.providers["new"].probed == 0
    rep = attach_placement(build_report([d]), [p], since=None, until=None, group="sales")
    assert rep.placement is not None and rep.placement.providers["new"].probed == 30
