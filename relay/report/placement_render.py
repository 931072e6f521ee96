"""The Placement section in text, HTML and CSV (JSON is `PlacementReport.to_dict`).

Kept beside the other renderers' modules so each of them only calls in: text
and HTML add this section when the report has placement figures, CSV adds
three columns per pair (relay.report.placement.placement_columns). See docs/report.md.
"""

from __future__ import annotations

import pygal
from markupsafe import Markup

from relay.report.format import fmt_int, fmt_rate
from relay.report.html import _chart, _count, _environment, _svg
from relay.report.model import PROVIDERS, Report
from relay.report.placement import (
    PlacementDivergence,
    PlacementReport,
    PlacementScope,
    PlacementStats,
    Side,
)
from relay.report.text import _rendered, _row, _table, _wrap

SHOWN_DIVERGENCES = 20  # text and HTML; JSON and CSV have all
CHART_FOLDERS = ("inbox", "junk", "other", "missing", "unknown")
FOLDER_COLORS = {
    "inbox": "#3b9c5a", "junk": "#d1495b", "other": "#4c72b0", "missing": "#8d8d8d",
    "unknown": "#e9c46a",
}  # fmt: skip


def _counts(s: PlacementStats) -> list[str]:
    return [fmt_int(getattr(s, f)) for f in ("probed", *CHART_FOLDERS)] + [fmt_rate(s.junk_rate)]


def _seconds(v: float) -> str:
    return f"{v:,.1f} s" if v < 10 else f"{v:,.0f} s"


def _side_text(p: str, s: Side) -> str:
    where = f"{s.folder} ({s.detail})" if s.detail and s.folder != "unknown" else s.folder
    after = "" if s.looked_after_s is None else f" after {_seconds(s.looked_after_s)}"
    verdict = " ".join(f"{k}={v}" for k, v in (s.verdict or {}).items())
    return f"{p:<6} {where}{after}" + (f"; verdict {verdict}" if verdict else "")


def _scope_table(title: str, scopes: list[PlacementScope], user: bool) -> list[str]:
    lead = ("user", "group") if user else ("group",)
    t = _table(
        title, (*lead, "provider", "probed", *CHART_FOLDERS, "junk rate"), left=len(lead) + 1
    )
    for sc in scopes:
        shown = [(p, s) for p, s in sc.providers.items() if s.probed] or list(sc.providers.items())[
            :1
        ]
        for i, (p, s) in enumerate(shown):
            names = [sc.name, sc.group or ""] if user else [sc.name]
            _row(t, *(names if i == 0 else [""] * len(names)), p, *_counts(s))
    return _rendered(t)


def _divergence_lines(d: PlacementDivergence) -> list[str]:
    out = _wrap(
        f"{d.received or '-'} {d.node} {d.queue_id} {d.rcpt} [{d.group}] junked by {d.junked_by}",
        "    ",
        "  ",
    )
    for p, s in (("legacy", d.legacy), ("new", d.new)):
        out += _wrap(_side_text(p, s), "        ", "    ")
    return out


def placement_text(report: Report) -> list[str]:
    """The text report's Placement section (nothing without placement figures)."""
    pl = report.placement
    if pl is None:
        return []
    out = ["Placement (where each delivered pilot copy was filed; unit: message × recipient)"]
    out += _wrap(f"placement logs: {', '.join(pl.files) or '-'}", "  ", "")
    out += _wrap(
        f"lines {pl.lines:,}, events {pl.events:,}, duplicates {pl.duplicates:,}, "
        f"corrupt lines {pl.corrupt_lines:,}",
        "  ",
        "",
    )
    for err in pl.errors:
        out += _wrap(f"warning: {err}", "  ", "")
    out.append("")
    t = _table("Placement per provider", ("provider", "probed", *CHART_FOLDERS, "junk rate"))
    for p, s in pl.providers.items():
        _row(t, p, *_counts(s))
    out += _rendered(t)
    out += _scope_table("Placement per group", pl.groups, user=False)
    if pl.users:
        out += _scope_table("Placement per pilot user", pl.users, user=True)
    out.append(
        f"Placement divergences: {len(pl.divergences)} (pilot pairs in one provider's Inbox "
        "and the other's Junk or missing)"
    )
    for d in pl.divergences[:SHOWN_DIVERGENCES]:
        out += _divergence_lines(d)
    if len(pl.divergences) > SHOWN_DIVERGENCES:
        more = len(pl.divergences) - SHOWN_DIVERGENCES
        out.append(f"  … and {more} more (JSON and CSV list all)")
    out.append("")
    th = report.thresholds
    out += _wrap(
        f"placement thresholds: min_probed_pairs {th.min_probed_pairs}, "
        f"max_junk_rate_increase {th.max_junk_rate_increase:g}",
        "  ",
        "",
    )
    out.append("")
    return out


# --------------------------------------------------------------------------- html


def placement_chart(pl: PlacementReport, provider: str) -> Markup:
    """One stacked bar per group (and "all"): how that provider filed the copies."""
    scopes: list[tuple[str, PlacementStats]] = [("all", pl.providers[provider])]
    scopes += [(g.name, g.providers[provider]) for g in pl.groups if g.providers[provider].probed]
    shown = [f for f in CHART_FOLDERS if any(getattr(s, f) for _, s in scopes)]
    chart = _chart(
        pygal.HorizontalStackedBar,
        f"chart-placement-{provider}",
        [FOLDER_COLORS[f] for f in shown],
        shown,
        title=f"Placement at {provider} (copies per folder)",
        width=640,
        height=max(220, 70 + 38 * len(scopes)),
        value_formatter=_count,
    )
    chart.x_labels = [name for name, _ in reversed(scopes)]  # "all" on top
    for f in shown:
        chart.add(f, [getattr(s, f) or None for _, s in reversed(scopes)])
    return _svg(chart)


def placement_html(report: Report) -> Markup | None:
    """The HTML report's Placement section, or None without placement figures."""
    pl = report.placement
    if pl is None:
        return None
    charts = {p: placement_chart(pl, p) for p in PROVIDERS if pl.providers[p].probed}
    html = (
        _environment()
        .get_template("placement.html.j2")
        .render(
            pl=pl,
            charts=charts,
            folders=CHART_FOLDERS,
            shown=pl.divergences[:SHOWN_DIVERGENCES],
            thresholds=report.thresholds,
            seconds=_seconds,
        )
    )
    return Markup(html)
