"""`relay demo` as a new user runs it: a subprocess, under 30 s, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay import dovecot

pytestmark = pytest.mark.timeout(90)


def test_demo_runs_reports_the_planted_spam_divergence_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr.decode()
    assert elapsed < 30, elapsed
    with pytest.raises(ProcessLookupError):  # no process left in the demo's session
        os.killpg(proc.pid, 0)

    text = stdout.decode()
    assert text.startswith("relay report\n"), text[:200]  # the relay's own log is on stderr
    assert "Per provider" in text and "Readiness" in text
    for name in ("deliveries.jsonl", "report.json"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    spam = [
        d for d in report["divergences"]
        if d["refused_by"] == "new" and d["new"]["smtp_code"] == 550
        and d["new"]["enhanced_code"] == "5.7.1" and d["legacy"]["outcome"] == "delivered"
    ]  # fmt: skip
    assert len(spam) == 1, report["divergences"]
    events = [json.loads(line) for line in (out / "deliveries.jsonl").read_text().splitlines()]
    deferred_then_delivered = {
        (e["queue_id"], e["rcpt"]) for e in events
        if e["event"] == "delivery" and e["provider"] == "new" and e["outcome"] == "deferred"
    }  # fmt: skip
    assert len(deferred_then_delivered) == 1
    (key,) = deferred_then_delivered
    final = [e for e in events if e["event"] == "delivery" and (e["queue_id"], e["rcpt"]) == key
             and e["provider"] == "new"]  # fmt: skip
    assert [e["outcome"] for e in final] == ["deferred", "delivered"]
    groups = {v["group"] for v in report["verdicts"]}
    assert groups == {"sales", "support", "marketing", "dev"}
    if dovecot.available() is None:
        return
    # Placement (Dovecot behind the stand-ins): the new provider junks marketing's
    # newsletters that legacy files in the Inbox; legacy junks the spam-like sample.
    placement = report["placement"]
    assert (out / "placement.jsonl").stat().st_size > 0
    assert placement["providers"]["new"]["junk"] > 0
    assert placement["providers"]["legacy"]["junk"] == 1
    assert {d["group"] for d in placement["divergences"]} == {"marketing"}
    verdicts = {v["group"]: v for v in report["verdicts"]}
    marketing = verdicts["marketing"]
    assert marketing["verdict"] == "not ready"
    assert "placement: new junked" in marketing["reason"] and "maximum +2" in marketing["reason"]
    assert "Placement per provider" in text
