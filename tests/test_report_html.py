"""`relay report --format html` and the demo's report.html, checked in headless Chromium.

Expected figures and mark counts are computed here from the demo's own
deliveries.jsonl and report.json (or from logs the tests write), never copied
from the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.report.command import report_command
from relay.report.html import CHART_IDS, MAX_HOURLY_BARS, activity_rows, render_html
from relay.report.logs import build_report
from relay.report.model import LATENCY_BUCKETS_MS, PROVIDERS
from relay.report.text import render_text
from tests.report_pages import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    by_id,
    chromium,
    measure_page,
    parse,
    svg_marks,
    table_rows,
    text_tables,
)

pytestmark = pytest.mark.timeout(120)

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "sample.jsonl"
SVG_NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


# --------------------------------------------------------------------------- expected marks


def bucket(latency: float) -> int:
    return next(
        (i for i, b in enumerate(LATENCY_BUCKETS_MS) if latency <= b), len(LATENCY_BUCKETS_MS)
    )


def final_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earliest final delivery event of each (message, recipient, provider)."""
    finals: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for e in events:
        if e["event"] != "delivery" or e["provider"] not in PROVIDERS:
            continue
        if e["outcome"] not in ("delivered", "bounced", "expired"):
            continue
        key = (e["node"], e["queue_id"], e["rcpt"].lower(), e["provider"])
        if key not in finals or e["ts"] < finals[key]["ts"]:
            finals[key] = e
    return list(finals.values())


def expected_marks(doc: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """(bars, visible bars) per chart id, from report.json and the delivery log.

    Every chart is of pilot pairs (report_version 2, SPEC Part 2: one population
    per comparison): the groups' delivery rates over their compared pairs, the
    compared pairs not delivered by both, the latency of pairs both delivered
    and the divergences per hour (the demo's span is short).
    """
    pilot = [g for g in doc["groups"] if g["comparison"] is not None]
    # group rates: one bar per pilot group with compared pairs and provider
    rates = [
        side["delivery_rate"]
        for g in pilot
        if g["comparison"]["compared_pairs"]
        for side in g["comparison"]["providers"].values()
    ]
    # joined: stacked, one segment per pilot group × class (other than both delivered)
    # of the dual/forwarded pairs shown; a zero one has no size
    cells = {
        (g["group"], j): sum(g["comparison"]["joined_by_mode"][m][j] for m in ("dual", "forwarded"))
        for g in pilot
        for j in ("legacy_only", "new_only", "both_failed", "pending")
    }
    classes = {j for (_, j), n in cells.items() if n}
    joined = (len(pilot) * len(classes), sum(1 for n in cells.values() if n))
    # latency: one bar per provider and non-empty bucket, of pilot pairs both delivered
    finals = final_events(events)
    by_pair: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for e in finals:
        if e.get("pilot") and e["outcome"] == "delivered":
            by_pair.setdefault((e["node"], e["queue_id"], e["rcpt"].lower()), {})[e["provider"]] = e
    lat = {
        (p, bucket(sides[p]["latency_ms"]))
        for sides in by_pair.values()
        if len(sides) == 2
        for p in PROVIDERS
    }
    # activity: stacked, one segment per hour (first to last) × kind shown, at the hour of
    # the refusing reply; a zero one has no size
    act = {(d[d["refused_by"]]["ts"][:13], d["kind"]) for d in doc["divergences"]}
    hours = sorted(datetime.strptime(h, "%Y-%m-%dT%H") for h, _ in act)
    span = int((hours[-1] - hours[0]) / timedelta(hours=1)) + 1 if hours else 0
    return {
        CHART_IDS["group_rates"]: (len(rates), sum(1 for r in rates if r)),
        CHART_IDS["joined"]: joined,
        CHART_IDS["latency"]: (len(lat), len(lat)),
        CHART_IDS["activity"]: (span * len({k for _, k in act}), len(act)),
    }


# --------------------------------------------------------------------------- the demo


@dataclass
class Demo:
    out: Path
    stdout: str
    html: str
    doc: dict[str, Any]
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (out / "deliveries.jsonl").read_text().splitlines()]
    return Demo(
        out=out,
        stdout=proc.stdout,
        html=(out / "report.html").read_text(encoding="utf-8"),
        doc=json.loads((out / "report.json").read_text()),
        events=events,
    )


def test_demo_writes_report_html_and_says_so(demo: Demo) -> None:
    assert f"wrote {demo.out / 'report.html'}" in demo.stdout
    assert demo.html.startswith("<!DOCTYPE html>")
    # the demo's planted cases show in the page: the spam refusal and the greylisting
    assert demo.doc["divergences"] and demo.doc["providers"]["new"]["deferrals"] >= 1


def test_page_is_self_contained(demo: Demo) -> None:
    html = demo.html
    for needle in ("<script", "<link", "<iframe", "<img", "@import", "url(", "src=", "href="):
        assert needle not in html.lower(), needle
    assert set(re.findall(r"(?:https?:)?//[^\s\"'<>)]+", html)) <= SVG_NAMESPACES
    assert "<!--" not in html  # pygal's comments link to its site
    doc = parse(html)
    for n in doc.walk():
        for k, v in n.attrs.items():
            if k in ("xmlns", "xmlns:xlink"):
                continue
            assert "//" not in v, (n.tag, k, v)


def test_charts_carry_as_many_marks_as_the_data(demo: Demo) -> None:
    doc = parse(demo.html)
    want = expected_marks(demo.doc, demo.events)
    got = {cid: svg_marks(by_id(doc, cid)) for cid in CHART_IDS.values()}
    assert got == want
    assert all(visible for _, visible in want.values())  # the demo has data for every chart


def test_verdicts_then_charts_then_tables(demo: Demo) -> None:
    """SPEC Part 2: verdicts, then charts, then tables; divergences grouped by reply."""
    doc = parse(demo.html)
    ids = [n.attrs["id"] for n in doc.walk() if n.tag == "section" and "id" in n.attrs]
    assert ids[:4] == ["readiness", "charts", "comparison", "divergences"]
    cards = by_id(doc, "readiness").find("article", "verdict")
    assert [(c.attrs["data-group"], c.find("span", "badge")[0].all_text()) for c in cards] == [
        (v["group"], v["verdict"].upper()) for v in demo.doc["verdicts"]
    ]
    for card, v in zip(cards, demo.doc["verdicts"], strict=True):
        assert " ".join(v["reason"].split()) in card.all_text()
    shown = 0
    for g in demo.doc["divergence_groups"]:
        rows = table_rows(by_id(doc, f"divergence-table-{g['kind']}"))
        row = next(r for r in rows if g["reply"] in r[2])
        assert int(row[0]) == g["count"] and g["examples"][0]["queue_id"] in row[-1]
        shown += g["count"]
    assert shown == len(demo.doc["divergences"]) > 0


def test_same_tables_as_the_text_report(demo: Demo) -> None:
    rep = build_report([demo.out / "deliveries.jsonl"])
    tables = text_tables(render_text(rep))
    doc = parse(render_html(rep))
    pairs = {  # the start of each table's title in the text report
        "Pilot comparison per group:": "comparison-table",
        "Pilot divergences per group:": "divergence-rate-table",
        "Pilot pairs per group by joined class": "joined-table",
        "Per provider, all traffic": "provider-table",
        "Latency, all traffic (ms)": "latency-table",
        "Reason classes, all traffic": "reason-table",
        "Per group, all traffic: outcomes": "group-table-outcomes",
        "Per group, all traffic: rates and latency (ms)": "group-table-rates",
        "Per pilot user: pilot pairs by joined class": "user-joined-table",
        "Per pilot user: outcomes": "user-table-outcomes",
        "Per pilot user: rates and latency (ms)": "user-table-rates",
    }
    for start, table_id in pairs.items():
        titles = [t for t in tables if t.startswith(start)]
        assert len(titles) == 1, (start, list(tables))
        rows = table_rows(by_id(doc, table_id))
        if table_id == "user-table-outcomes":  # the page also shows the group there
            rows = [[r[0], *r[2:]] for r in rows]
        assert [" ".join(cells).split() for cells in rows] == tables[titles[0]], start


# --------------------------------------------------------------------------- in Chromium


MARKS_JS = """(ids) => Object.fromEntries(ids.map((id) => {
  const svg = document.getElementById(id);
  if (!svg) return [id, null];
  const rects = [...svg.querySelectorAll(':scope > g > g.plot > g.series > g.bars > g.bar > rect')];
  const visible = rects.filter((r) => {
    const b = r.getBoundingClientRect();
    return b.width > 0 && b.height > 0;
  });
  const box = svg.getBoundingClientRect();
  return [id, {marks: rects.length, visible: visible.length, width: box.width, height: box.height}];
}))"""


def test_demo_report_in_headless_chromium(demo: Demo, tmp_path: Path) -> None:
    sync_playwright = chromium()
    started = time.monotonic()
    url = (demo.out / "report.html").resolve().as_uri()
    requests: list[str] = []
    refused: list[str] = []
    screenshot = tmp_path / "report.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})

            def route(r: Any) -> None:
                if r.request.url == url:
                    r.continue_()
                else:
                    refused.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("request", lambda req: requests.append(req.url))
            page.goto(url, wait_until="load")
            page.screenshot(path=str(screenshot))
            placement_ids = [
                f"chart-placement-{p}" for p in demo.doc.get("placement", {}).get("providers", {})
            ]
            marks = page.evaluate(MARKS_JS, [*CHART_IDS.values(), *placement_ids])
            cards = page.evaluate(
                "() => [...document.querySelectorAll('#readiness .verdict')].map("
                "(c) => [c.dataset.group, c.querySelector('.badge').textContent.trim(),"
                " c.getBoundingClientRect().top])"
            )
            first_chart_top = page.evaluate(
                "() => document.getElementById('chart-group-rates').getBoundingClientRect().top"
            )
            page.emulate_media(media="print")
            breaks = page.evaluate(
                "() => [...document.querySelectorAll('figure.chart')].map("
                "(f) => getComputedStyle(f).breakInside)"
            )
        finally:
            browser.close()

    assert requests == [url] and refused == []  # nothing but the file itself
    want = expected_marks(demo.doc, demo.events)
    for cid, (n, visible) in want.items():
        m = marks[cid]
        assert m is not None, cid
        assert (m["marks"], m["visible"]) == (n, visible), cid
        assert m["width"] > 400 and m["height"] > 150, (cid, m)
    assert [(g, b) for g, b, _ in cards] == [
        (v["group"], v["verdict"].upper()) for v in demo.doc["verdicts"]
    ]
    assert all(top < 600 for _, _, top in cards)  # the verdicts are on the first screen
    assert all(top < first_chart_top for _, _, top in cards)
    # SPEC Part 2: with placement figures (Dovecot behind the demo) a chart per provider more
    assert breaks == ["avoid"] * (len(CHART_IDS) + len(placement_ids))
    for cid in placement_ids:  # a bar for all copies and one per group, stacked by folder
        stats = demo.doc["placement"]
        prov = cid.removeprefix("chart-placement-")
        scopes = [stats["providers"][prov]] + [
            g["providers"][prov] for g in stats["groups"] if g["providers"][prov]["probed"]
        ]
        folders = [
            f for f in ("inbox", "junk", "other", "missing", "unknown") if any(s[f] for s in scopes)
        ]
        visible = sum(1 for s in scopes for f in folders if s[f])
        assert (marks[cid]["marks"], marks[cid]["visible"]) == (len(scopes) * len(folders), visible)
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 1280 and int.from_bytes(png[20:24], "big") == 2000
    keep = os.environ.get("RELAY_REPORT_SCREENSHOT")
    if keep:  # e.g. RELAY_REPORT_SCREENSHOT=/tmp/relay-report.png to look at it
        shutil.copyfile(screenshot, keep)
    assert time.monotonic() - started < 30


def test_demo_charts_have_no_clipped_or_overlapping_text(demo: Demo) -> None:
    """SPEC Part 2: no clipped legend, no overlapping labels (measured in Chromium)."""
    m = measure_page(demo.out / "report.html", width=1280, height=800)
    # plus one placement chart per probed provider when the demo ran with Dovecot
    placement = {c for c in m["charts"] if c.startswith("chart-placement-")}
    assert set(m["charts"]) - placement == set(CHART_IDS.values())
    for cid, chart in m["charts"].items():
        assert (chart["clipped"], chart["overlaps"]) == ([], []), cid
    assert m["overflowing"] == [] and m["page_width"] <= 1280
    # the comparison's charts in the first two screens (placement has its own section)
    assert max(c["bottom"] for k, c in m["charts"].items() if k not in placement) <= 2 * 800


# --------------------------------------------------------------------------- builder data


def _ev(kind: str, ts: str, **kw: Any) -> str:
    return json.dumps({"event": kind, "ts": ts, "node": "n1", **kw})


def _message(qid: str, ts: str, rcpt: str, group: str | None) -> str:
    plan = [
        {"rcpt": rcpt, "provider": p, "delivered_to": rcpt, "role": role, "group": group,
         "mode": "dual" if group else None, "pilot": group is not None}
        for p, role in (("legacy", "primary"), ("new", "shadow"))
        if group or p == "legacy"
    ]  # fmt: skip
    return _ev("received", ts, queue_id=qid, mail_from="s@x.test", rcpts=[rcpt], plan=plan,
               forwarded=False)  # fmt: skip


def _delivery(qid: str, ts: str, rcpt: str, prov: str, outcome: str, lat: float, **kw: Any) -> str:
    code = {"delivered": 250, "deferred": 451}.get(outcome, 550)
    return _ev("delivery", ts, queue_id=qid, rcpt=rcpt, provider=prov, outcome=outcome,
               smtp_code=code, enhanced_code=None, smtp_response=f"{code} reply", attempt=1,
               latency_ms=lat, **kw)  # fmt: skip


def test_builder_counts_latency_buckets_and_hours(tmp_path: Path) -> None:
    """Chart data are of pilot pairs: latency of pairs both delivered, divergences per hour."""
    log = tmp_path / "d.jsonl"
    lines = [
        _message("Q1", "2026-11-25T09:59:00.000Z", "a@example.com", "sales"),
        _delivery("Q1", "2026-11-25T09:59:00.010Z", "a@example.com", "legacy", "delivered", 10),
        _delivery("Q1", "2026-11-25T10:00:02.000Z", "a@example.com", "new", "delivered", 62000),
        # a crash duplicate: the earliest delivered event counts, once
        _delivery("Q1", "2026-11-25T11:00:00.000Z", "a@example.com", "new", "delivered", 9e6),
        _message("Q2", "2026-11-25T10:30:00.000Z", "b@example.com", "sales"),
        _delivery("Q2", "2026-11-25T10:30:00.011Z", "b@example.com", "legacy", "delivered", 10.5),
        _delivery("Q2", "2026-11-25T10:30:01.000Z", "b@example.com", "new", "deferred", 1000),
        _delivery("Q2", "2026-11-25T12:30:01.000Z", "b@example.com", "new", "bounced", 7.2e6),
        _message("Q3", "2026-11-25T10:31:00.000Z", "z@example.com", None),
        _delivery("Q3", "2026-11-25T10:31:00+01:00", "z@example.com", "legacy", "delivered", 1e9),
        _ev("rejected", "2026-11-25T12:05:00.000Z", client_ip="192.0.2.1", stage="rcpt"),
        _message("Q4", "2026-11-25T09:00:00.000Z", "c@example.com", "dev"),
        _delivery("Q4", "2026-11-25T09:10:00+00:00", "c@example.com", "legacy", "bounced", 6e5),
        _ev("bounce_sent", "2026-11-25T09:10:01.000Z", queue_id="Q4", rcpt="c@example.com"),
        _delivery("Q4", "2026-11-25T09:00:02.000Z", "c@example.com", "new", "delivered", 2000),
    ]
    log.write_text("\n".join(lines) + "\n")
    rep = build_report([log])
    n = len(LATENCY_BUCKETS_MS) + 1
    legacy, new = [0] * n, [0] * n
    legacy[0] += 1  # Q1 at 10 ms: "≤ 10 ms" (inclusive bound)
    new[LATENCY_BUCKETS_MS.index(300_000)] += 1  # Q1 at 62 s; Q2-Q4 are not both delivered
    assert rep.latency_histogram == {"legacy": legacy, "new": new}
    got = {h.hour: h.divergences for h in rep.hourly}
    assert got == {
        "2026-11-25T09:00:00Z": {"new_refused": 0, "cutover_refused": 0, "legacy_refused": 1},
        "2026-11-25T12:00:00Z": {"new_refused": 1, "cutover_refused": 0, "legacy_refused": 0},
    }
    assert not {"latency_histogram", "hourly"} & set(rep.to_dict())
    unit, rows = activity_rows(rep)
    assert unit == "hour" and [r[0] for r in rows] == [
        "2026-11-25 09:00", "2026-11-25 10:00", "2026-11-25 11:00", "2026-11-25 12:00"
    ]  # fmt: skip
    assert [v for _, v in rows] == [[0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0]]
    # --tz: the same hours, shown in that zone
    unit, rows = activity_rows(build_report([log], tz="Europe/Paris"))
    assert [r[0] for r in rows] == [f"2026-11-25 {h}:00" for h in (10, 11, 12, 13)]
    # the rendered chart: one bar per non-zero (hour, series) cell
    doc = parse(render_html(rep))
    assert svg_marks(by_id(doc, CHART_IDS["activity"])) == (8, 2)  # stacked: 4 hours × 2 kinds
    assert svg_marks(by_id(doc, CHART_IDS["latency"])) == (2, 2)


def test_activity_shows_days_over_a_long_span(tmp_path: Path) -> None:
    log = tmp_path / "d.jsonl"
    lines = []
    for day in range(5):
        qid, t = f"Q{day}", f"2026-11-{20 + day}T08:00:00.000Z"
        lines += [
            _message(qid, t, "a@example.com", "sales"),
            _delivery(qid, t, "a@example.com", "legacy", "delivered", 5),
            _delivery(qid, t, "a@example.com", "new", "bounced", 5),
        ]
    log.write_text("\n".join(lines) + "\n")
    rep = build_report([log])
    unit, rows = activity_rows(rep)
    assert MAX_HOURLY_BARS < 4 * 24  # 08:00 on the 20th to 08:00 on the 24th
    assert unit == "day" and [r for r, _ in rows] == [f"2026-11-{d}" for d in range(20, 25)]
    assert Counter(v[0] for _, v in rows) == {1: 5}


# --------------------------------------------------------------------------- command, edge cases


def test_report_command_writes_html(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report_command, [str(FIXTURE), "--format", "html", "-o", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    doc = parse(html)
    for cid in CHART_IDS.values():
        assert by_id(doc, cid).tag == "svg"
    res = CliRunner().invoke(report_command, [str(FIXTURE), "--format", "html", "--group", "sales"])
    assert res.exit_code == 0 and "<!DOCTYPE html>" in res.output


def test_log_text_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    log = tmp_path / "d.jsonl"
    lines = [
        _message("Q1", "2026-11-25T09:00:00.000Z", "a@example.com", evil),
        _delivery("Q1", "2026-11-25T09:00:01.000Z", "a@example.com", "legacy", "delivered", 5),
        _delivery("Q1", "2026-11-25T09:00:02.000Z", "a@example.com", "new", "bounced", 9).replace(
            "550 reply", f"550 5.7.1 spam {evil}"
        ),
    ]
    log.write_text("\n".join(lines) + "\n")
    html = render_html(build_report([log]))
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert evil in parse(html).all_text()


def test_empty_log_renders(tmp_path: Path) -> None:
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    html = render_html(build_report([log]))
    doc = parse(html)
    for cid in CHART_IDS.values():
        assert svg_marks(by_id(doc, cid)) == (0, 0)
    assert "No pilot groups" in doc.all_text()
