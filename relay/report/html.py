"""`relay report --format html`: one self-contained page for the pilot's sponsor.

The page shows the verdicts first, then four charts, then every table of the
text report. Charts are drawn by pygal as inline SVG; the page is laid out by
the Jinja2 template `relay/report/templates/report.html.j2`. Nothing is fetched
when the file is opened: CSS is inline, the SVGs carry no script (pygal's
external tooltip script and its inline config script are left out) and no
comment or link to elsewhere.

Every chart compares the providers on one population (pilot pairs), says which
in its title, and is laid out so that no text is clipped or overlaps another:
value labels are printed only where they fit, legends get as many columns as
their longest entry allows, and rate axes are zoomed to the data. pygal places
text with its own estimate of text width (0.6 em a character); CHAR_EM is the
wider one used here to decide what fits.

Each chart's `<svg>` has a stable id (CHART_IDS): pygal names a chart's root
`chart-<uuid>` and scopes its CSS by that id, so the uuid is set to a fixed name.
See docs/report.md ("html") for what each chart shows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import jinja2
import pygal
from markupsafe import Markup
from pygal.style import Style

from relay.report.divergences import SHOWN_PER_KIND, worst
from relay.report.format import (
    fmt_int,
    fmt_ms,
    fmt_pct,
    fmt_rate,
    fmt_reply,
    fmt_small_pct,
    fmt_time,
    joined_label,
    kind_title,
    outcome_text,
    reply_text,
    shown_providers,
)
from relay.report.inputs import check_tz
from relay.report.model import (
    DIVERGENCE_KINDS,
    JOINED,
    LATENCY_BUCKETS_MS,
    PROVIDERS,
    REPORT_VERSION,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_READY,
    VERDICT_READY,
    Comparison,
    Report,
)
from relay.report.reasons import REASON_LABELS
from relay.report.text import ALL_PILOTS, pilot_scopes, providers_title, scope_title
from relay.report.text import joined_rows as joined_table_rows

# Stable element ids of the charts (the <svg> elements).
CHART_IDS: dict[str, str] = {
    "group_rates": "chart-group-rates",
    "joined": "chart-joined",
    "latency": "chart-latency",
    "activity": "chart-activity",
}

# Above this many hours between the first and last active hour, the activity
# chart shows days instead (a bar per hour would be unreadable).
MAX_HOURLY_BARS = 72

WIDTH = 600  # every chart's viewBox width: two per row on a laptop
HEIGHT = 340
CHAR_EM = 0.66  # width of an average character in em, generous for system-ui fonts
FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
TITLE_PX, LEGEND_PX, LABEL_PX, VALUE_PX = 16, 13, 12, 12
MARGIN, SPACING = 12, 10
PROVIDER_COLORS = {"legacy": "#4c72b0", "new": "#2a9d8f"}
JOINED_COLORS = {
    "both_delivered": "#3b9c5a",
    "legacy_only": "#d1495b",
    "new_only": "#e08a2b",
    "both_failed": "#6d597a",
    "pending": "#e9c46a",
}
KIND_COLORS = {"new_refused": "#d1495b", "cutover_refused": "#8e2c3a", "legacy_refused": "#4c72b0"}


# --------------------------------------------------------------------------- charts


def text_px(text: str, size: int) -> float:
    """Width of a text line in px, erring wide (deciding what fits)."""
    return len(text) * size * CHAR_EM


def _strip_svg(root: Any) -> Any:
    """pygal XML filter: drop comments (links to pygal's site) and <script> elements."""
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag
            if callable(tag) or (isinstance(tag, str) and tag.rsplit("}", 1)[-1] == "script"):
                parent.remove(child)
    return root


def legend_columns(titles: Sequence[str], width: float) -> int:
    """Legend columns at the bottom: the most that divide the entries evenly and fit.

    pygal reserves `entries // columns` rows, so only an even split gets every
    row room; each column is `width / columns` wide, which must hold its title.
    """
    n = len(titles)
    need = max((text_px(t, LEGEND_PX) for t in titles), default=0) + 30
    for cols in range(n, 1, -1):
        if n % cols == 0 and width / cols >= need:
            return cols
    return 1


def _chart(
    cls: type[Any], name: str, colors: Sequence[str], titles: Sequence[str], **config: Any
) -> Any:
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
        title_font_size=TITLE_PX,
        legend_font_size=LEGEND_PX,
        label_font_size=LABEL_PX,
        major_label_font_size=LABEL_PX,
        value_font_size=VALUE_PX,
        no_data_font_size=18,
    )
    config.setdefault("width", WIDTH)
    config.setdefault("height", HEIGHT)
    chart = cls(
        style=style,
        js=[],  # no external tooltip script
        disable_xml_declaration=True,
        legend_at_bottom=True,
        legend_at_bottom_columns=legend_columns(titles, config["width"] - 2 * MARGIN - 80),
        truncate_legend=-1,
        truncate_label=-1,
        print_zeroes=False,
        print_values=True,
        margin=MARGIN,
        spacing=SPACING,
        **config,
    )
    chart.uuid = name.removeprefix("chart-")  # the <svg> id is "chart-" + uuid
    chart.add_xml_filter(_strip_svg)
    return chart


def _svg(chart: Any) -> Markup:
    return Markup(chart.render(is_unicode=True))


def _shown_if(fits: bool, v: float | None) -> Any:
    """A value, with its printed label left out where it does not fit."""
    if v is None or fits:
        return v
    return {"value": v, "formatter": lambda _: ""}


def _plot_width(labels: Sequence[str]) -> float:
    """The plot's width in a horizontal chart, after the category labels on the left."""
    return WIDTH - 2 * MARGIN - max((text_px(x, LABEL_PX) for x in labels), default=0) - 20


def zoom(values: Sequence[float]) -> tuple[float, float, list[float]]:
    """A rate axis (percent) zoomed to the data: its ends and ticks, on a round step.

    The low end sits below the lowest value by half the values' spread (at
    least 0.25 point), so that 98 % and 100 % look different and no bar is
    empty; the high end is the highest value rounded up, at most 100 %.
    """
    low, high = min(values, default=100.0), max(values, default=100.0)
    spread = max(high - low, 0.5)
    lo_raw, hi_raw = max(0.0, low - spread / 2), min(100.0, high + spread / 4)
    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 25) if s * 4 >= hi_raw - lo_raw)
    lo = max(0.0, math.floor(lo_raw / step) * step)
    hi = min(100.0, math.ceil(hi_raw / step - 1e-9) * step)
    ticks = [round(lo + i * step, 6) for i in range(round((hi - lo) / step) + 1)]
    return lo, hi, ticks


def _percent(v: float) -> str:
    return f"{v:.1f} %"


def _axis_percent(v: float) -> str:
    return f"{round(v, 1):g} %"


def _count(v: float) -> str:
    """Counts, also on the axis: pygal may put guides at fractions, left unlabelled."""
    return f"{v:,.0f}" if float(v).is_integer() else ""


def pilot_groups(report: Report) -> list[tuple[str, Comparison]]:
    """The pilot groups and their comparisons, in report order."""
    return [(n, c) for n, c in pilot_scopes(report) if n != ALL_PILOTS]


def group_rates(report: Report) -> list[tuple[str, dict[str, float | None]]]:
    """(group, provider -> delivered % of compared pairs, 1 decimal) per pilot group compared."""
    rows = []
    for name, c in pilot_groups(report):
        if c.compared_pairs:
            rates = {p: c.providers[p].delivery_rate for p in PROVIDERS}
            pct = {p: None if r is None else round(r * 100, 1) for p, r in rates.items()}
            rows.append((name, pct))
    return rows


def group_rates_chart(report: Report) -> Markup:
    """Horizontal bars: each pilot group's delivered share of its compared pairs, per provider."""
    rows = group_rates(report)[::-1]  # pygal draws the first category at the bottom
    values = [v for _, r in rows for v in r.values() if v is not None]
    lo, hi, ticks = zoom(values)
    titles = [report.labels[p] for p in PROVIDERS]
    plot_w = _plot_width([name for name, _ in rows]) - 28
    chart = _chart(
        pygal.HorizontalBar,
        CHART_IDS["group_rates"],
        [PROVIDER_COLORS[p] for p in PROVIDERS],
        titles,
        title="Delivered, % of compared pilot pairs",
        margin_right=MARGIN + 28,  # the last axis label ("100.0 %") is centred on the edge
        height=max(HEIGHT, 140 + 44 * len(rows)),
        range=(lo, hi),
        zero=lo,
        y_labels=ticks,
        value_formatter=_percent,
        formatter=_percent,
        y_labels_major_every=1,
        no_data_text="no compared pairs",
    )
    chart.y_label_formatter = _axis_percent
    chart.x_labels = [name for name, _ in rows]
    for p, title in zip(PROVIDERS, titles, strict=True):
        cells = []
        for _, r in rows:
            v = r[p]
            bar = 0.0 if v is None else (v - lo) / (hi - lo) * plot_w
            cells.append(_shown_if(bar >= text_px(_percent(v or 0), VALUE_PX) + 6, v))
        chart.add(title, cells)
    return _svg(chart)


def compared_joined(c: Comparison) -> dict[str, int]:
    """Joined classes of the pairs both providers were to deliver (dual and forwarded)."""
    modes = [c.joined_by_mode[m] for m in ("dual", "forwarded")]
    return {j: sum(m[j] for m in modes) for j in JOINED}


def joined_rows(report: Report) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """The classes other than both_delivered that occur among the pairs both providers
    were to deliver, and their counts per pilot group."""
    groups = [(name, compared_joined(c)) for name, c in pilot_groups(report)]
    shown = [j for j in JOINED[1:] if any(counts[j] for _, counts in groups)]
    return shown, [(name, [counts[j] for j in shown]) for name, counts in groups]


def joined_chart(report: Report) -> Markup:
    """Stacked horizontal bars: pairs both providers were to deliver, not delivered by both."""
    shown, rows = joined_rows(report)
    rows = rows[::-1]
    titles = [joined_label(j, report.labels) for j in shown]
    plot_w = _plot_width([n for n, _ in rows])
    top = max((sum(v) for _, v in rows), default=0) or 1
    chart = _chart(
        pygal.HorizontalStackedBar,
        CHART_IDS["joined"],
        [JOINED_COLORS[j] for j in shown],
        titles,
        title="Compared pilot pairs not delivered by both",
        height=max(HEIGHT, 140 + 34 * len(rows)),
        value_formatter=_count,
        formatter=_count,
        no_data_text="every pilot pair delivered by both",
    )
    chart.x_labels = [name for name, _ in rows]
    for i, title in enumerate(titles):
        cells = []
        for _, counts in rows:
            n = counts[i]
            fits = n / top * plot_w >= text_px(f"{n:,}", VALUE_PX) + 6
            cells.append(_shown_if(fits, n or None))
        chart.add(title, cells)
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


def _every(labels: Sequence[str], slot: float) -> int:
    """Show every n-th x label so that labels `slot` px apart do not overlap."""
    widest = max((text_px(x, LABEL_PX) for x in labels), default=0) + 8
    return max(1, math.ceil(widest / slot)) if slot > 0 else 1


def _bars(
    chart: Any,
    titles: Sequence[str],
    columns: Sequence[Sequence[int]],
    slot: float,
    stacked: bool,
) -> None:
    """Add the series of a vertical bar chart, with values printed if they all fit.

    `columns[i]` are series i's values per x slot (`slot` px wide); side by side
    bars share a slot, stacked ones have it each, and a stacked segment needs
    the height of a line too. Some labels but not others would read as a gap.
    """
    width = slot * 0.88 / (1 if stacked else max(1, len(titles)))
    top = max((sum(col) for col in zip(*columns, strict=True)), default=0)
    plot_h = HEIGHT - 150

    def fits(v: int) -> bool:
        wide = width >= text_px(f"{v:,}", VALUE_PX) + 4
        return wide and (not stacked or v / top * plot_h >= VALUE_PX + 4)

    every = all(fits(v) for values in columns for v in values if v)
    for title, values in zip(titles, columns, strict=True):
        chart.add(title, [_shown_if(every, v or None) for v in values])


def latency_chart(report: Report) -> Markup:
    """Grouped bars: pilot pairs both delivered per latency bucket, one series per provider."""
    labels, hist = latency_buckets(report)
    titles = [report.labels[p] for p in PROVIDERS]
    slot = (WIDTH - 2 * MARGIN - 60) / max(1, len(labels))
    every = _every(labels, slot)
    chart = _chart(
        pygal.Bar,
        CHART_IDS["latency"],
        [PROVIDER_COLORS[p] for p in PROVIDERS],
        titles,
        title="Latency of pilot pairs both delivered",
        value_formatter=_count,
        formatter=_count,
        print_values_position="top",
        x_labels_major_every=every,
        show_minor_x_labels=every == 1,
        no_data_text="no pilot pair delivered by both",
    )
    chart.x_labels = labels
    _bars(chart, titles, [hist[p] for p in PROVIDERS], slot, stacked=False)
    return _svg(chart)


def activity_rows(report: Report) -> tuple[str, list[tuple[str, list[int]]]]:
    """("hour" or "day", [(label, [divergences per DIVERGENCE_KINDS])]) with gaps filled.

    Hours and days are those of the report's zone (`--tz`).
    """
    tz = check_tz(report.tz)
    hours = report.hourly
    if not hours:
        return "hour", []

    def start(hour: str) -> datetime:
        return datetime.strptime(hour, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).astimezone(tz)

    first, last = start(hours[0].hour), start(hours[-1].hour)
    span = int((last - first) / timedelta(hours=1)) + 1
    if span <= MAX_HOURLY_BARS:
        unit, fmt, n = "hour", "%Y-%m-%d %H:%M", span
        keys = [_shift(first, timedelta(hours=i), tz).strftime(fmt) for i in range(n)]
    else:
        unit, fmt = "day", "%Y-%m-%d"
        n = (last.date() - first.date()).days + 1
        keys = [(first.date() + timedelta(days=i)).strftime(fmt) for i in range(n)]
    rows = {k: [0] * len(DIVERGENCE_KINDS) for k in keys}
    for h in hours:
        row = rows.setdefault(start(h.hour).strftime(fmt), [0] * len(DIVERGENCE_KINDS))
        for i, kind in enumerate(DIVERGENCE_KINDS):
            row[i] += h.divergences.get(kind, 0)
    return unit, sorted(rows.items())


def _shift(t: datetime, by: timedelta, tz: tzinfo) -> datetime:
    """`t + by` in absolute time, shown in `tz` (one bar per real hour across DST)."""
    return (t.astimezone(UTC) + by).astimezone(tz)


def activity_chart(report: Report) -> Markup:
    """Stacked bars per hour (or day): divergences by kind, at the time of the refusal."""
    unit, rows = activity_rows(report)
    kinds = [i for i, _ in enumerate(DIVERGENCE_KINDS) if any(v[i] for _, v in rows)]
    titles = [_kind_legend(DIVERGENCE_KINDS[i], report.labels) for i in kinds]
    short = [label[5:] for label, _ in rows]  # the year is in the page's header
    slot = (WIDTH - 2 * MARGIN - 50) / max(1, len(rows))
    every = _every(short, slot)
    chart = _chart(
        pygal.StackedBar,
        CHART_IDS["activity"],
        [KIND_COLORS[DIVERGENCE_KINDS[i]] for i in kinds],
        titles,
        title=f"Divergences per {unit} ({report.tz})",
        value_formatter=_count,
        formatter=_count,
        x_labels_major_every=every,
        show_minor_x_labels=every == 1,
        no_data_text="no divergences",
    )
    chart.x_labels = short
    _bars(chart, titles, [[v[i] for _, v in rows] for i in kinds], slot, stacked=True)
    return _svg(chart)


def _kind_legend(kind: str, labels: dict[str, str]) -> str:
    return {
        "new_refused": f"refused by {labels['new']}",
        "cutover_refused": "refused to cut-over users",
        "legacy_refused": f"refused by {labels['legacy']}",
    }[kind]


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
        "small_rate": lambda r: "-" if r is None else fmt_small_pct(r),
        "pct": lambda r: "-" if r is None else fmt_pct(r),
        "ms": fmt_ms,
        "signed_ms": _signed_ms,
        "reply": reply_text,
        "outcome_text": outcome_text,
        "verdict_class": _verdict_class,
    }
    env.filters.update(filters)
    env.globals.update(
        scope_rows=shown_providers,
        fmt_reply=fmt_reply,
        joined_label=joined_label,
        joined_rows=joined_table_rows,
        kind_title=kind_title,
        worst=worst,
    )
    return env


def render_html(report: Report) -> str:
    """The HTML report: verdicts first, then the charts, then every table."""
    from relay.report.placement_render import placement_html  # it builds on this module

    charts = {
        "group_rates": group_rates_chart(report),
        "joined": joined_chart(report),
        "latency": latency_chart(report),
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
    tz = check_tz(report.tz)
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            report=report,
            charts=charts,
            chart_ids=CHART_IDS,
            verdict_counts={k: v for k, v in counts.items() if v},
            providers=PROVIDERS,
            labels=report.labels,
            title=providers_title(report.labels),
            pilot_scopes=pilot_scopes(report),
            user_scopes=[(u.name, u.comparison) for u in report.users if u.comparison],
            compared_joined=compared_joined,
            comparisons={n: c for n, c in pilot_scopes(report)},
            joined=JOINED,
            kinds=DIVERGENCE_KINDS,
            shown_per_kind=SHOWN_PER_KIND,
            reason_labels=REASON_LABELS,
            scope_title=scope_title,
            activity_unit=activity_rows(report)[0],
            time=lambda ts: fmt_time(ts, tz),
            report_version=REPORT_VERSION,
            placement=placement_html(report),
        )
    )


__all__ = [
    "CHART_IDS",
    "activity_chart",
    "activity_rows",
    "group_rates",
    "group_rates_chart",
    "joined_chart",
    "joined_rows",
    "latency_buckets",
    "latency_chart",
    "render_html",
    "zoom",
]
