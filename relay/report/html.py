"""`relay report --format html`: one self-contained page for the pilot's sponsor.

The page holds the text report's content (as tables) plus four charts. Charts
are drawn by pygal as inline SVG; the page is laid out by the Jinja2 template
`relay/report/templates/report.html.j2`. Nothing is fetched when the file is opened:
CSS is inline, the SVGs carry no script (pygal's external tooltip script and
its inline config script are left out) and no comment or link to elsewhere.

Each chart's `<svg>` has a stable id (CHART_IDS): pygal names a chart's root
`chart-<uuid>` and scopes its CSS by that id, so the uuid is set to a fixed name.
See docs/report.md ("html") for what each chart shows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
import pygal
from markupsafe import Markup
from pygal.style import Style

from relay.report.format import fmt_int, fmt_ms, fmt_rate, outcome_text, reply_text, shown_providers
from relay.report.model import (
    LATENCY_BUCKETS_MS,
    OUTCOMES,
    PROVIDERS,
    REPORT_VERSION,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_READY,
    VERDICT_READY,
    HourCounts,
    Report,
)
from relay.report.reasons import REASON_LABELS

# Stable element ids of the charts (the <svg> elements).
CHART_IDS: dict[str, str] = {
    "outcomes": "chart-outcomes",
    "latency": "chart-latency",
    "group_rates": "chart-group-rates",
    "activity": "chart-activity",
}

# Above this many hours between the first and last active hour, the activity
# chart shows days instead (a bar per hour would be unreadable).
MAX_HOURLY_BARS = 72

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
PROVIDER_COLORS = {"legacy": "#4c72b0", "new": "#2a9d8f"}
OUTCOME_COLORS = {
    "delivered": "#3b9c5a",
    "bounced": "#d1495b",
    "expired": "#e08a2b",
    "deleted": "#8d8d8d",
    "pending": "#e9c46a",
}
# Activity series: (label, color); values come from HourCounts.
ACTIVITY_SERIES: tuple[tuple[str, str], ...] = (
    ("legacy delivered", PROVIDER_COLORS["legacy"]),
    ("new delivered", PROVIDER_COLORS["new"]),
    ("legacy refused", "#8e2c3a"),
    ("new refused", "#f28482"),
    ("refused at SMTP (relay)", "#7d5ba6"),
)


# --------------------------------------------------------------------------- charts


def _strip_svg(root: Any) -> Any:
    """pygal XML filter: drop comments (links to pygal's site) and <script> elements."""
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag
            if callable(tag) or (isinstance(tag, str) and tag.rsplit("}", 1)[-1] == "script"):
                parent.remove(child)
    return root


def _chart(cls: type[Any], name: str, colors: Sequence[str], **config: Any) -> Any:
    style = Style(
        font_family=FONT,
        background="transparent",
        plot_background="#ffffff",
        foreground="#333333",
        foreground_strong="#111111",
        foreground_subtle="#666666",
        colors=tuple(colors),
        opacity="0.95",
        opacity_hover="1",
        transition="0ms",
        title_font_size=17,
        legend_font_size=14,
        label_font_size=13,
        major_label_font_size=13,
        value_font_size=13,
        no_data_font_size=24,
    )
    chart = cls(
        style=style,
        js=[],  # no external tooltip script
        disable_xml_declaration=True,
        legend_at_bottom=True,
        truncate_legend=-1,
        truncate_label=-1,
        print_zeroes=False,
        no_data_text="no data",
        margin=12,
        spacing=12,
        **config,
    )
    chart.uuid = name.removeprefix("chart-")  # the <svg> id is "chart-" + uuid
    chart.add_xml_filter(_strip_svg)
    return chart


def _svg(chart: Any) -> Markup:
    return Markup(chart.render(is_unicode=True))


def _count(v: float) -> str:
    """Counts, also on the axis: pygal may put guides at fractions, left unlabelled."""
    return f"{v:,.0f}" if float(v).is_integer() else ""


def _percent(v: float) -> str:
    return f"{round(v, 1):g} %"


def outcomes_chart(report: Report) -> Markup:
    """Stacked horizontal bars: one bar per planned provider, one segment per outcome."""
    # pygal stacks horizontal bars from the bottom up: reversed, legacy is on top
    provs = [p for p in reversed(PROVIDERS) if report.providers[p].planned]
    counts = {o: [getattr(report.providers[p], o) for p in provs] for o in OUTCOMES}
    shown = [o for o in OUTCOMES if any(counts[o])]
    chart = _chart(
        pygal.HorizontalStackedBar,
        CHART_IDS["outcomes"],
        [OUTCOME_COLORS[o] for o in shown],
        title="Outcomes per provider (message × recipient pairs)",
        width=640,
        height=300,
        print_values=True,
        value_formatter=_count,
        legend_at_bottom_columns=max(1, len(shown)),
    )
    chart.x_labels = provs
    for o in shown:
        chart.add(o, counts[o])
    return _svg(chart)


def latency_buckets(report: Report) -> tuple[list[str], dict[str, list[int]]]:
    """Bucket labels and counts per provider, from the first to the last non-empty bucket."""
    labels = [f"≤ {_duration(b)}" for b in LATENCY_BUCKETS_MS]
    labels.append(f"> {_duration(LATENCY_BUCKETS_MS[-1])}")
    hist = {p: report.latency_histogram.get(p) or [0] * len(labels) for p in PROVIDERS}
    used = [i for i in range(len(labels)) if any(hist[p][i] for p in PROVIDERS)]
    if not used:
        return [], {p: [] for p in PROVIDERS}
    lo, hi = used[0], used[-1] + 1
    return labels[lo:hi], {p: hist[p][lo:hi] for p in PROVIDERS}


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def latency_chart(report: Report) -> Markup:
    """Grouped bars: delivered pairs per latency bucket, one series per provider."""
    labels, hist = latency_buckets(report)
    chart = _chart(
        pygal.Bar,
        CHART_IDS["latency"],
        [PROVIDER_COLORS[p] for p in PROVIDERS],
        title="Latency of final deliveries (pairs per bucket)",
        width=960,
        height=380,
        print_values=True,
        value_formatter=_count,
        x_title="time from the relay's 250 to the provider's reply",
        y_title="pairs",
        x_label_rotation=30 if len(labels) > 12 else 0,
        legend_at_bottom_columns=2,
    )
    chart.x_labels = labels
    for p in PROVIDERS:
        chart.add(p, [c or None for c in hist[p]])
    return _svg(chart)


def group_rates_chart(report: Report) -> Markup:
    """Side-by-side bars: delivery rate of each provider in each group."""
    chart = _chart(
        pygal.Bar,
        CHART_IDS["group_rates"],
        [PROVIDER_COLORS[p] for p in PROVIDERS],
        title="Delivery rate per group (delivered / planned)",
        width=640,
        height=340,
        range=(0, 100),
        print_values=True,
        print_values_position="top",
        value_formatter=_percent,
        x_label_rotation=30 if len(report.groups) > 6 else 0,
        legend_at_bottom_columns=2,
    )
    chart.x_labels = [g.name for g in report.groups]
    for p in PROVIDERS:
        rates = [g.providers[p].delivery_rate for g in report.groups]
        chart.add(p, [None if r is None else round(r * 100, 1) for r in rates])
    return _svg(chart)


def activity_rows(report: Report) -> tuple[str, list[tuple[str, list[int]]]]:
    """("hour" or "day", [(label, [value per ACTIVITY_SERIES])]) with gaps filled."""
    hours = report.hourly
    if not hours:
        return "hour", []

    def start(h: HourCounts) -> datetime:
        return datetime.strptime(h.hour, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

    first, last = start(hours[0]), start(hours[-1])
    span = int((last - first) / timedelta(hours=1)) + 1
    if span <= MAX_HOURLY_BARS:
        unit, fmt, step, n = "hour", "%Y-%m-%d %H:00", timedelta(hours=1), span
    else:
        unit, fmt, step = "day", "%Y-%m-%d", timedelta(days=1)
        n = (last.date() - first.date()).days + 1
    rows = {(first + i * step).strftime(fmt): [0] * len(ACTIVITY_SERIES) for i in range(n)}
    for h in hours:
        row = rows[start(h).strftime(fmt)]
        values = (*(h.delivered.get(p, 0) for p in PROVIDERS),
                  *(h.refused.get(p, 0) for p in PROVIDERS), h.relay_rejections)  # fmt: skip
        for i, v in enumerate(values):
            row[i] += v
    return unit, list(rows.items())


def activity_chart(report: Report) -> Markup:
    """Grouped bars per hour (or day): pairs delivered / refused per provider, SMTP refusals."""
    unit, rows = activity_rows(report)
    chart = _chart(
        pygal.Bar,
        CHART_IDS["activity"],
        [c for _, c in ACTIVITY_SERIES],
        title=f"Deliveries and rejections per {unit} (UTC, by the time of the final reply)",
        width=960,
        height=380,
        value_formatter=_count,
        print_values=len(rows) <= 12,
        print_values_position="top",
        x_label_rotation=30 if len(rows) > 8 else 0,
        show_minor_x_labels=len(rows) <= 24,
        x_labels_major_every=max(1, len(rows) // 12),
        legend_at_bottom_columns=len(ACTIVITY_SERIES),
        y_title="pairs",
    )
    chart.x_labels = [label for label, _ in rows]
    for i, (name, _) in enumerate(ACTIVITY_SERIES):
        chart.add(name, [vals[i] or None for _, vals in rows])
    return _svg(chart)


# --------------------------------------------------------------------------- page


def _verdict_class(verdict: str) -> str:
    if verdict == VERDICT_READY:
        return "ready"
    if verdict == VERDICT_INSUFFICIENT:
        return "insufficient"
    return "not-ready"


def _signed_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:+,.0f} ms"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("relay.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    filters: dict[str, Callable[..., str]] = {
        "int": fmt_int,
        "rate": fmt_rate,
        "ms": fmt_ms,
        "signed_ms": _signed_ms,
        "reply": reply_text,
        "outcome_text": outcome_text,
        "verdict_class": _verdict_class,
    }
    env.filters.update(filters)
    env.globals["scope_rows"] = shown_providers
    return env


def render_html(report: Report) -> str:
    """The HTML report: verdicts first, then divergences, charts and every table."""
    from relay.report.placement_render import placement_html  # it builds on this module

    charts = {
        "outcomes": outcomes_chart(report),
        "latency": latency_chart(report),
        "group_rates": group_rates_chart(report),
        "activity": activity_chart(report),
    }
    counts = {
        label: sum(1 for v in report.verdicts if v.verdict == verdict)
        for verdict, label in (
            (VERDICT_READY, "ready"),
            (VERDICT_NOT_READY, "not ready"),
            (VERDICT_INSUFFICIENT, "insufficient data"),
        )
    }
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            report=report,
            charts=charts,
            chart_ids=CHART_IDS,
            verdict_counts={k: v for k, v in counts.items() if v},
            providers=PROVIDERS,
            reason_labels=REASON_LABELS,
            activity_unit=activity_rows(report)[0],
            report_version=REPORT_VERSION,
            placement=placement_html(report),
        )
    )


__all__ = [
    "CHART_IDS",
    "activity_chart",
    "activity_rows",
    "group_rates_chart",
    "latency_buckets",
    "latency_chart",
    "outcomes_chart",
    "render_html",
]
