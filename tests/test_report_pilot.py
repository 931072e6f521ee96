"""The report for a real pilot (SPEC Part 2): a generated month of logs, every new figure.

`tests/report_month.py` writes a month of traffic on two nodes and keeps what it
decided for every pair; the expected joined classes, comparisons, divergences
(by reply), rates and verdicts are computed here from that, then compared with
the text, JSON, CSV and HTML outputs of `relay report`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.privacy import KEY_ENV, Pseudonymizer
from relay.report.command import report_command
from relay.report.html import CHART_IDS
from relay.report.reasons import REASON_LABELS
from tests.report_month import LABELS, Month, Pair, make_month
from tests.report_pages import by_id, measure_page, parse, table_rows, text_tables
from tests.test_report import USERS, Log

pytestmark = pytest.mark.timeout(120)

TZ = "Europe/Paris"
KEY = "a key for the tests"
REFUSED = ("bounced", "expired")
MODES = ("dual", "forwarded", "cutover", "paused")
JOINED = ("both_delivered", "legacy_only", "new_only", "both_failed", "pending")
KINDS = ("new_refused", "cutover_refused", "legacy_refused")
CSV_KIND = {"new_refused": "new refused", "legacy_refused": "legacy refused",
            "cutover_refused": "cut-over refused", "": ""}  # fmt: skip


# --------------------------------------------------------------------------- expected figures


def joined_class(p: Pair) -> str:
    """Who delivered a pilot pair; a forwarded copy's legacy side is the original it holds."""
    legacy = "delivered" if p.shape == "forwarded" else (p.legacy.outcome if p.legacy else None)
    new = p.new.outcome if p.new else None
    if "pending" in (legacy, new):
        return "pending"
    return {(True, True): "both_delivered", (True, False): "legacy_only",
            (False, True): "new_only", (False, False): "both_failed"}[
        (legacy == "delivered", new == "delivered")]  # fmt: skip


def divergence_kind(p: Pair) -> str:
    if joined_class(p) == "pending":
        return ""
    if p.shape == "dual":
        assert p.legacy and p.new
        if p.legacy.outcome == "delivered" and p.new.outcome in REFUSED:
            return "new_refused"
        if p.new.outcome == "delivered" and p.legacy.outcome in REFUSED:
            return "legacy_refused"
    if p.shape == "cutover" and p.new and p.new.outcome in REFUSED:
        return "cutover_refused"
    return ""


def nearest_rank(values: list[int], pct: int) -> int:
    s = sorted(values)
    return s[math.ceil(pct / 100 * len(s)) - 1]


def ratio(a: int, b: int, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


def latency(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None}
    return {"count": len(values), "p50": nearest_rank(values, 50),
            "p95": nearest_rank(values, 95), "max": max(values)}  # fmt: skip


def expected_comparison(pairs: list[Pair]) -> dict[str, Any]:
    """A scope's comparison, as docs/report.md defines it, from the pairs' fates."""
    by_mode = {m: dict.fromkeys(JOINED, 0) for m in MODES}
    for p in pairs:
        by_mode[p.shape][joined_class(p)] += 1
    compared = [p for p in pairs
                if p.shape in ("dual", "forwarded") and joined_class(p) != "pending"]  # fmt: skip
    delivered = {
        "legacy": sum(1 for p in compared
                      if p.shape == "forwarded" or (p.legacy and p.legacy.outcome == "delivered")),
        "new": sum(1 for p in compared if p.new and p.new.outcome == "delivered"),
    }  # fmt: skip
    both = [p for p in compared if p.shape == "dual" and joined_class(p) == "both_delivered"]
    lat = {
        "legacy": latency([p.legacy.latency_ms for p in both if p.legacy and p.legacy.latency_ms]),
        "new": latency([p.new.latency_ms for p in both if p.new and p.new.latency_ms]),
    }
    cutover = [p for p in pairs if p.shape == "cutover" and joined_class(p) != "pending"]
    pending = sum(1 for p in pairs if p.shape != "paused" and joined_class(p) == "pending")
    kinds = Counter(divergence_kind(p) for p in pairs)
    judged = len(compared) + len(cutover)
    p95 = (lat["legacy"]["p95"], lat["new"]["p95"])
    return {
        "pilot_pairs": len(pairs),
        "joined": {j: sum(by_mode[m][j] for m in MODES) for j in JOINED},
        "joined_by_mode": by_mode,
        "compared_pairs": len(compared),
        "providers": {
            prov: {
                "delivered": delivered[prov],
                "refused": len(compared) - delivered[prov],
                "delivery_rate": ratio(delivered[prov], len(compared)),
                "latency_ms": lat[prov],
            }
            for prov in ("legacy", "new")
        },
        "delivery_ratio": ratio(delivered["new"], delivered["legacy"]),
        "p95_increase_ms": None if None in p95 else p95[1] - p95[0],
        "cutover_pairs": len(cutover),
        "judged_pairs": judged,
        "divergences": {k: kinds[k] for k in KINDS},
        "divergence_rate": ratio(kinds["new_refused"] + kinds["cutover_refused"], judged, 6),
        "pending_pairs": pending,
        "pending_ratio": ratio(pending, judged + pending),
    }


def expected_verdict(c: dict[str, Any]) -> tuple[str, list[str]]:
    """The verdict under the default thresholds, and the rules not met."""
    if c["judged_pairs"] < 20:
        return "insufficient data", ["min_pairs"]
    failed = []
    if c["delivery_ratio"] is not None and c["delivery_ratio"] < 0.99:
        failed.append("min_delivery_ratio")
    if c["p95_increase_ms"] is not None and c["p95_increase_ms"] > 60000:
        failed.append("max_p95_increase_ms")
    if c["divergence_rate"] > 0.005:
        failed.append("max_divergence_rate")
    if c["pending_ratio"] is not None and c["pending_ratio"] > 0.05:
        failed.append("max_pending_ratio")
    return ("not ready" if failed else "ready"), failed


def by_group(month: Month) -> dict[str, list[Pair]]:
    groups: dict[str, list[Pair]] = {}
    for p in month.pilot_pairs():
        groups.setdefault(p.group, []).append(p)
    return dict(sorted(groups.items()))


def refusal(p: Pair, kind: str) -> Any:
    side = p.legacy if kind == "legacy_refused" else p.new
    assert side is not None
    return side


def expected_reply_groups(month: Month) -> dict[tuple[str, str], dict[str, Any]]:
    """Divergences by kind and reply (the generator's reply template), with their figures."""
    groups: dict[tuple[str, str], list[Pair]] = {}
    for p in sorted(month.pilot_pairs(), key=lambda p: (p.received, p.node, p.queue_id)):
        kind = divergence_kind(p)
        if kind:
            side = refusal(p, kind)
            template = "expired" if side.outcome == "expired" else str(side.template)
            groups.setdefault((kind, template), []).append(p)
    return {
        key: {"count": len(ps), "users": len({p.rcpt for p in ps}),
              "groups": sorted({p.group for p in ps}), "first": ps[0].received,
              "last": ps[-1].received, "reply": refusal(ps[0], key[0]).reply,
              "reason": refusal(ps[0], key[0]).reason}
        for key, ps in groups.items()
    }  # fmt: skip


# --------------------------------------------------------------------------- the outputs


@dataclass
class Outputs:
    month: Month
    doc: dict[str, Any]
    rows: list[dict[str, str]]
    text: str
    html: str


def run(paths: Iterable[Path], *args: str, key: str | None = None) -> str:
    env = {KEY_ENV: key} if key else None
    res = CliRunner().invoke(report_command, [*map(str, paths), "--tz", TZ, *args], env=env)
    assert res.exit_code == 0, res.output
    return res.output


def outputs(month: Month, *args: str, key: str | None = None) -> Outputs:
    return Outputs(
        month=month,
        doc=json.loads(run(month.paths, "--format", "json", *args, key=key)),
        rows=list(csv.DictReader(io.StringIO(run(month.paths, "--format", "csv", *args, key=key)))),
        text=run(month.paths, *args, key=key),
        html=run(month.paths, "--format", "html", *args, key=key),
    )


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Month:
    return make_month(tmp_path_factory.mktemp("month"))


@pytest.fixture(scope="module")
def plain(month: Month) -> Outputs:
    return outputs(month)


# --------------------------------------------------------------------------- JSON


def test_the_month_has_what_the_report_must_handle(month: Month) -> None:
    classes = Counter(joined_class(p) for p in month.pilot_pairs())
    assert set(classes) == set(JOINED)  # every joined class occurs
    rates = {g: expected_comparison(ps)["divergence_rate"] for g, ps in by_group(month).items()}
    assert rates["sales"] < 0.005 < rates["marketing"]  # below and above the threshold
    cut = [p for p in month.pilot_pairs() if p.shape == "cutover"]
    assert any(divergence_kind(p) == "cutover_refused" for p in cut)  # a cut-over user fails
    assert len(month.paths) == 3 and month.paths[0].name.endswith(".1.gz")


def test_json_comparison_joined_classes_and_verdicts(plain: Outputs) -> None:
    doc, month = plain.doc, plain.month
    assert doc["report_version"] == 2 and doc["labels"] == LABELS and doc["tz"] == TZ
    groups = {g["group"]: g for g in doc["groups"]}
    expected = {g: expected_comparison(ps) for g, ps in by_group(month).items()}
    for name, c in expected.items():
        assert groups[name]["comparison"] == c, name
    assert doc["comparison"] == expected_comparison(month.pilot_pairs())
    assert groups["(non-pilot)"]["comparison"] is None
    verdicts = {v["group"]: (v["verdict"], v["failed"]) for v in doc["verdicts"]}
    assert verdicts == {g: expected_verdict(c) for g, c in expected.items()}
    assert verdicts["sales"] == ("ready", [])
    assert verdicts["dev"][0] == "insufficient data"
    assert "max_divergence_rate" in verdicts["marketing"][1]
    # the cut-over user is judged: its refusals count, and the verdict says so
    support = next(v for v in doc["verdicts"] if v["group"] == "support")
    cut = expected["support"]
    assert cut["cutover_pairs"] and cut["divergences"]["cutover_refused"]
    assert (
        f"{cut['divergences']['cutover_refused']} of {cut['cutover_pairs']} cut-over pairs "
        f"refused by {LABELS['new']}"
    ) in support["reason"]
    users = {u["user"]: u for u in doc["users"]}
    for rcpt in {p.rcpt for p in month.pilot_pairs()}:
        pairs = [p for p in month.pilot_pairs() if p.rcpt == rcpt]
        assert users[rcpt]["comparison"] == expected_comparison(pairs), rcpt


def test_json_lists_every_divergence_and_every_reply(plain: Outputs) -> None:
    doc, month = plain.doc, plain.month
    want = sorted(
        (p.node, p.queue_id, p.rcpt, divergence_kind(p))
        for p in month.pilot_pairs()
        if divergence_kind(p)
    )
    assert sorted((d["node"], d["queue_id"], d["rcpt"], d["kind"]) for d in doc["divergences"]) == (
        want
    )
    for d in doc["divergences"]:
        side = d["legacy" if d["kind"] == "legacy_refused" else "new"]
        assert side["outcome"] in REFUSED and side["ts"] and side["reason"]
    expected = expected_reply_groups(month)
    got = doc["divergence_groups"]
    assert len(got) == len(expected)
    assert sum(g["count"] for g in got) == len(want)
    for g in got:
        e = next(
            e for (kind, _), e in expected.items() if kind == g["kind"] and e["reply"] == g["reply"]
        )
        assert (g["count"], g["users"], g["groups"], g["reason"]) == (
            e["count"], e["users"], e["groups"], e["reason"]
        )  # fmt: skip
        assert (g["first_received"], g["last_received"]) == (e["first"], e["last"])
    counts = [g["count"] for g in got if g["kind"] == "new_refused"]
    assert counts == sorted(counts, reverse=True)  # the worst first


def test_csv_has_the_class_of_every_pair(plain: Outputs) -> None:
    rows = {(r["node"], r["queue_id"], r["rcpt"]): r for r in plain.rows}
    assert len(rows) == len(plain.rows) == len(plain.month.pairs)
    for p in plain.month.pairs:
        row = rows[(p.node, p.queue_id, p.rcpt)]
        assert row["class"] == (joined_class(p) if p.pilot else ""), p
        assert row["divergence"] == (CSV_KIND[divergence_kind(p)] if p.pilot else "")
        assert row["pilot"] == ("true" if p.pilot else "false")


# --------------------------------------------------------------------------- text and HTML


def pct(r: float | None) -> str:
    return "-" if r is None else f"{r * 100:.1f} %"


def small_pct(r: float | None) -> str:
    return "-" if r is None else f"{round(r * 100, 2):g} %"


def ms(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def scopes(month: Month) -> list[tuple[str, dict[str, Any]]]:
    out = [(g, expected_comparison(ps)) for g, ps in by_group(month).items()]
    return [*out, ("all pilots", expected_comparison(month.pilot_pairs()))]


def comparison_rows(month: Month) -> list[list[str]]:
    """The comparison table's rows, as whitespace-split tokens."""
    rows = []
    for name, c in scopes(month):
        for i, prov in enumerate(("legacy", "new")):
            s = c["providers"][prov]
            lat = s["latency_ms"]
            rows.append(
                f"{name if i == 0 else ''} {LABELS[prov]} {c['compared_pairs']:,} "
                f"{s['delivered']:,} {s['refused']:,} {pct(s['delivery_rate'])} "
                f"{ms(lat['p50'])} {ms(lat['p95'])} {ms(lat['max'])}".split()
            )
    return rows


def divergence_rows(month: Month) -> list[list[str]]:
    return [
        f"{name} {c['judged_pairs']:,} {c['divergences']['new_refused']:,} "
        f"{c['divergences']['cutover_refused']:,} {small_pct(c['divergence_rate'])} "
        f"{c['divergences']['legacy_refused']:,} {c['pending_pairs']:,}".split()
        for name, c in scopes(month)
    ]


def joined_table_rows(month: Month) -> list[list[str]]:
    rows = []
    names = {"dual": "dual", "forwarded": "forwarded", "cutover": "cut-over", "paused": "paused"}
    for name, c in scopes(month):
        modes = [(names[m], n) for m, n in c["joined_by_mode"].items() if any(n.values())]
        if len(modes) > 1:
            modes.append(("all", c["joined"]))
        for i, (mode, n) in enumerate(modes):
            cells = " ".join(f"{n[j]:,}" for j in JOINED)
            rows.append(f"{name if i == 0 else ''} {mode} {cells}".split())
    return rows


def test_text_report(plain: Outputs) -> None:
    text, month = plain.text, plain.month
    assert max(len(line) for line in text.splitlines()) <= 100
    tables = text_tables(text)

    def table(start: str) -> list[list[str]]:
        (title,) = [t for t in tables if t.startswith(start)]
        return tables[title]

    assert table("Pilot comparison per group:") == comparison_rows(month)
    assert table("Pilot divergences per group:") == divergence_rows(month)
    assert table("Pilot pairs per group by joined class") == joined_table_rows(month)
    flat = " ".join(text.split())
    verdicts = {v["group"]: v for v in plain.doc["verdicts"]}
    for g, c in scopes(month)[:-1]:
        verdict, _ = expected_verdict(c)
        assert f"{g}: {verdict.upper()} — {' '.join(verdicts[g]['reason'].split())}" in flat
    # the divergences, grouped by reply (fewer than 20 replies per kind here: all shown)
    for e in expected_reply_groups(month).values():
        line = f"{e['count']:,} {REASON_LABELS[e['reason']]} · {e['reply']}"
        assert " ".join(line.split()) in flat, line
    # times are in --tz: the first pair's received time, shown in Paris time (UTC+1 in Nov)
    first = min(p.received for p in month.pairs)
    hh = int(first[11:13]) + 1
    assert f"received: {first[:10]} {hh:02d}:{first[14:16]} .." in text
    assert f"providers: {LABELS['legacy']} (legacy) vs {LABELS['new']} (new)" in text
    # the text stays short: a month of pairs, a few hundred lines
    assert len(text.splitlines()) < 400


def test_html_tables_cards_and_charts_agree(plain: Outputs) -> None:
    doc, month = parse(plain.html), plain.month
    assert [" ".join(r).split() for r in table_rows(by_id(doc, "comparison-table"))] == (
        comparison_rows(month)
    )
    assert [" ".join(r).split() for r in table_rows(by_id(doc, "divergence-rate-table"))] == (
        divergence_rows(month)
    )
    assert [" ".join(r).split() for r in table_rows(by_id(doc, "joined-table"))] == (
        joined_table_rows(month)
    )
    # the same percentages, population named, on the card, in the table and on the chart
    expected = dict(scopes(month)[:-1])
    chart = by_id(doc, CHART_IDS["group_rates"])
    assert "compared pilot pairs" in chart.all_text()
    chart_values = Counter(t.all_text() for t in chart.find("text", "value") if t.all_text())
    want_chart: Counter[str] = Counter()
    for card in by_id(doc, "readiness").find("article", "verdict"):
        c = expected[card.attrs["data-group"]]
        figures = dict(zip((dt.all_text() for dt in card.find("dt")),
                           (dd.all_text() for dd in card.find("dd")), strict=True))  # fmt: skip
        assert figures["compared pairs"] == f"{c['compared_pairs']:,}"
        for prov in ("legacy", "new"):
            s = c["providers"][prov]
            assert (
                figures[f"{LABELS[prov]} delivered"]
                == f"{s['delivered']:,} · {pct(s['delivery_rate'])}"
            )
            want_chart[pct(s["delivery_rate"])] += 1
        rate = small_pct(c["divergence_rate"])
        against = c["divergences"]["new_refused"] + c["divergences"]["cutover_refused"]
        assert figures[f"divergences (of {c['judged_pairs']:,})"] == f"{against:,} · {rate}"
    assert chart_values == want_chart
    # provider labels everywhere, no bare "legacy"/"new" in the comparison tables
    assert LABELS["new"] in by_id(doc, "comparison-table").all_text()
    ids = [n.attrs["id"] for n in doc.walk() if n.tag == "section" and "id" in n.attrs]
    assert ids[:2] == ["readiness", "charts"]  # verdicts, then charts, then tables


def test_label_and_tz_options(month: Month) -> None:
    doc = json.loads(run(month.paths, "--format", "json", "--label", "new=Google Workspace"))
    assert doc["labels"] == {"legacy": LABELS["legacy"], "new": "Google Workspace"}
    assert any(v["reason"].startswith("Google Workspace delivered") for v in doc["verdicts"])
    for bad in (["--tz", "Mars/Olympus"], ["--label", "newer=X"], ["--label", "new"]):
        res = CliRunner().invoke(report_command, [str(month.paths[0]), *bad])
        assert res.exit_code == 2, bad
        assert bad[0] in res.output


def test_divergences_shown_are_the_worst_per_kind(tmp_path: Path) -> None:
    """More than 20 replies of one kind: text and HTML show the 20 most frequent."""
    log = Log("mx1")
    alice = USERS[0]
    n = 0
    for reply in range(25):  # reply r refused r + 1 times
        for _ in range(reply + 1):
            n += 1
            qid = f"Q{n:04d}"
            log.received(qid, n, [alice])
            log.delivery(qid, n + 1, alice.addr, "legacy", "delivered")
            log.delivery(qid, n + 1, alice.addr, "new", "bounced", code=550, enhanced="5.7.1",
                         response=f"550 5.7.1 rule {'x' * (reply + 1)} refused it")  # fmt: skip
    path = log.write(tmp_path / "d.jsonl")
    doc = json.loads(run([path], "--format", "json"))
    assert len(doc["divergence_groups"]) == 25 and len(doc["divergences"]) == n
    text = run([path])
    shown = [r for r in range(25) if f"rule {'x' * (r + 1)} refused" in text]
    assert shown == list(range(5, 25))  # the 20 with the most divergences
    assert "… 5 more replies (15 divergences): see the JSON or CSV" in text
    html = parse(run([path], "--format", "html"))
    assert len(table_rows(by_id(html, "divergence-table-new_refused"))) == 20


# --------------------------------------------------------------------------- pseudonyms


def secrets_of(month: Month) -> list[str]:
    """What must not appear in a pseudonymized output: local parts and Message-IDs."""
    locals_ = {p.rcpt.partition("@")[0] for p in month.pairs}
    mids = {p.message_id for p in month.pairs} | {p.message_id[1:-1] for p in month.pairs}
    return sorted(locals_ | mids)


def figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON document without what names people: the figures must not change."""
    d = json.loads(json.dumps(doc))
    d.pop("pseudonymized")
    d["users"] = sorted(json.dumps({k: v for k, v in u.items() if k != "user"}) for u in d["users"])
    for div in d["divergences"]:
        div.pop("rcpt")
        for side in ("legacy", "new"):
            div[side].pop("smtp_response")
    d["divergences"].sort(key=lambda x: (x["node"], x["queue_id"]))
    d["divergence_groups"] = sorted(
        json.dumps({k: v for k, v in g.items() if k != "reply"}) for g in d["divergence_groups"]
    )
    return d


@pytest.fixture(scope="module")
def pseudonymized(month: Month) -> Outputs:
    return outputs(month, "--pseudonymize", key=KEY)


def test_pseudonymized_outputs_hide_people_and_keep_figures(
    plain: Outputs, pseudonymized: Outputs
) -> None:
    secrets = secrets_of(plain.month)
    for name in ("text", "html"):
        out = getattr(pseudonymized, name).lower()
        assert [s for s in secrets if s.lower() in out] == [], name
    raw = json.dumps(pseudonymized.doc) + json.dumps(pseudonymized.rows)
    assert [s for s in secrets if s.lower() in raw.lower()] == []
    assert any(s in plain.text for s in secrets)  # the plain report does show them
    assert pseudonymized.doc["pseudonymized"] is True
    assert figures(pseudonymized.doc) == figures(plain.doc)
    p = Pseudonymizer(KEY.encode())
    assert {u["user"] for u in pseudonymized.doc["users"]} == {
        p.address(u["user"]) for u in plain.doc["users"]
    }
    strip = [{k: v for k, v in r.items() if k not in ("rcpt", "legacy_response", "new_response")}
             for r in plain.rows]  # fmt: skip
    assert [{k: v for k, v in r.items() if k not in ("rcpt", "legacy_response", "new_response")}
            for r in pseudonymized.rows] == strip  # fmt: skip
    assert [p.address(r["rcpt"]) for r in plain.rows] == [r["rcpt"] for r in pseudonymized.rows]


def test_pseudonyms_are_stable_and_keyed(month: Month, pseudonymized: Outputs) -> None:
    again = json.loads(run(month.paths, "--format", "json", "--pseudonymize", key=KEY))
    assert again == pseudonymized.doc  # stable across runs
    other = json.loads(run(month.paths, "--format", "json", "--pseudonymize", key="other key"))
    assert {u["user"] for u in other["users"]}.isdisjoint(u["user"] for u in again["users"])
    res = CliRunner().invoke(
        report_command, [str(month.paths[0]), "--pseudonymize"], env={KEY_ENV: ""}
    )
    assert res.exit_code == 2 and KEY_ENV in res.output


def hashed_copy(month: Month, folder: Path) -> list[Path]:
    """The month's logs as `log_privacy: hash` writes them (same key)."""
    p = Pseudonymizer(KEY.encode())
    out = []
    for path in month.paths:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        lines = []
        for line in raw.decode().splitlines():
            ev = json.loads(line)
            if ev["event"] == "config":
                ev["log_privacy"] = "hash"
            else:
                ev = p.event(ev)
            lines.append(json.dumps(ev))
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = ("\n".join(lines) + "\n").encode()
        target.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
        out.append(target)
    return out


def test_the_report_works_the_same_on_hashed_logs(
    month: Month, pseudonymized: Outputs, tmp_path: Path
) -> None:
    hashed = hashed_copy(month, tmp_path)
    secrets = secrets_of(month)
    assert not [s for s in secrets if s in "".join(p.read_text() for p in hashed[1:])]
    doc = json.loads(run(hashed, "--format", "json"))
    twice = json.loads(run(hashed, "--format", "json", "--pseudonymize", key=KEY))

    def same(d: dict[str, Any]) -> dict[str, Any]:
        d = {**d, "inputs": {**d["inputs"], "files": None}}
        d.pop("pseudonymized")
        return d

    # a plain report of hashed logs = a pseudonymized report of the plain logs (same key),
    # and --pseudonymize does not hash twice what the log already hashed
    assert same(doc) == same(pseudonymized.doc) == same(twice)


# --------------------------------------------------------------------------- in Chromium


def test_month_report_in_headless_chromium(plain: Outputs, tmp_path: Path) -> None:
    """At 1280 px: verdicts and charts within two screens, no clipped or overlapping text."""
    page = tmp_path / "report.html"
    page.write_text(plain.html, encoding="utf-8")
    m = measure_page(page, width=1280, height=800)
    screens = 2 * 800
    assert m["cards"] and all(bottom <= screens for bottom in m["cards"]), m["cards"]
    assert set(m["charts"]) == set(CHART_IDS.values())
    for cid, chart in m["charts"].items():
        assert chart["bottom"] <= screens, (cid, chart["bottom"])
        assert chart["texts"] > 5, cid
        assert chart["clipped"] == [], (cid, chart["clipped"])
        assert chart["overlaps"] == [], (cid, chart["overlaps"])
    assert m["overflowing"] == [], m["overflowing"]  # no card or cell wider than its box
    assert m["page_width"] <= 1280
