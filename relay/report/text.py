"""`relay report` (text): aligned tables readable at 100 columns, no colour.

One function per section, in the order they are printed; tables are drawn by
rich on a colourless console of TEXT_WIDTH columns.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from relay.report.format import (
    fmt_int,
    fmt_ms,
    fmt_rate,
    outcome_text,
    reply_text,
    shown_providers,
)
from relay.report.model import Latency, ProviderStats, Report, ScopeStats
from relay.report.reasons import REASON_LABELS

TEXT_WIDTH = 100


def _wrap(text: str, indent: str = "", first: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        width=TEXT_WIDTH,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first or indent]


def _table(title: str, cols: Sequence[str], left: int = 1) -> Table:
    """A table whose first `left` columns are text (folded) and the rest figures."""
    t = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
    )
    for i, c in enumerate(cols):
        if i < left:
            t.add_column(c, justify="left", overflow="fold", min_width=8)
        else:
            t.add_column(c, justify="right", no_wrap=True)
    return t


def _rendered(t: Table) -> list[str]:
    buf = io.StringIO()
    con = Console(
        file=buf,
        width=TEXT_WIDTH,
        no_color=True,
        color_system=None,
        force_terminal=False,
        emoji=False,
        highlight=False,
    )
    con.print(t)
    return [*buf.getvalue().splitlines(), ""]


def _row(t: Table, *cells: str) -> None:
    """Cells as plain Text: rich would otherwise read "[…]" in a group name as markup."""
    t.add_row(*(Text(c) for c in cells))


def _count_cells(s: ProviderStats) -> list[str]:
    """The planned … deferrals columns, shared by the provider and the scope tables."""
    counts = (s.planned, s.delivered, s.bounced, s.expired, s.deleted, s.pending, s.deferrals)
    return [fmt_int(x) for x in counts]


def _rate_cells(s: ProviderStats) -> tuple[str, str]:
    """The "rate" and "1st try" columns."""
    return fmt_rate(s.delivery_rate), fmt_rate(s.first_attempt_success)


def _latency_cells(lat: Latency) -> tuple[str, str, str]:
    """The "p50", "p95" and "max" columns."""
    return fmt_ms(lat.p50), fmt_ms(lat.p95), fmt_ms(lat.max)


def _header(report: Report) -> list[str]:
    inp, tot, flt = report.inputs, report.totals, report.filters
    out = ["relay report"]
    out += _wrap(f"logs: {', '.join(inp.files) or '-'}", "  ", "")
    out.append(
        f"filters: since {flt.get('since') or '-'}, until {flt.get('until') or '-'} "
        f"(exclusive), group {flt.get('group') or '-'}"
    )
    out.append(f"received: {tot.first_received or '-'} .. {tot.last_received or '-'}")
    out += _wrap(
        f"messages {tot.messages:,}, pairs {tot.pairs:,} (pilot {tot.pilot_pairs:,}, "
        f"forwarded {tot.forwarded_pairs:,}, discarded {tot.discarded_pairs:,}), "
        f"DSNs sent {tot.bounces_sent:,}, refused at SMTP {tot.relay_rejections:,}",
        "  ",
        "",
    )
    out += _wrap(
        f"lines {inp.lines:,}, events {inp.events:,}, corrupt lines {inp.corrupt_lines:,}, "
        f"orphan events {inp.orphan_events:,}, late events {inp.late_events:,}, "
        f"duplicate deliveries {inp.duplicate_deliveries:,}, "
        f"open messages {inp.open_messages:,}",
        "  ",
        "",
    )
    for err in inp.errors:
        out += _wrap(f"warning: {err}", "  ", "")
    out.append("")
    return out


def _providers(report: Report) -> list[str]:
    t = _table(
        "Per provider (unit: message × recipient)",
        ("provider", "planned", "delivered", "bounced", "expired", "deleted", "pending",
         "deferrals", "rate", "1st try"),
    )  # fmt: skip
    for p, s in report.providers.items():
        _row(t, p, *_count_cells(s), *_rate_cells(s))
    return _rendered(t)


def _latency(report: Report) -> list[str]:
    t = _table("Latency of final deliveries (ms)", ("provider", "count", "p50", "p95", "max"))
    for p, s in report.providers.items():
        lat = s.latency_ms
        _row(t, p, fmt_int(lat.count), *_latency_cells(lat))
    return _rendered(t)


def _reasons(report: Report) -> list[str]:
    provs = list(report.providers)
    t = _table(
        "Reason classes (bounced pairs; deferred attempts)",
        ("class", *(f"{p} bounced" for p in provs), *(f"{p} deferred" for p in provs)),
    )
    for r, label in REASON_LABELS.items():
        _row(
            t,
            label,
            *(fmt_int(report.providers[p].rejections[r]) for p in provs),
            *(fmt_int(report.providers[p].deferral_reasons[r]) for p in provs),
        )
    return _rendered(t)


def _scope_outcomes(kind: str, scopes: list[ScopeStats]) -> list[str]:
    t = _table(
        f"Per {'pilot user' if kind == 'user' else 'group'}: outcomes",
        (kind, "provider", "planned", "delivered", "bounced", "expired", "deleted",
         "pending", "deferrals"),
        left=2,
    )  # fmt: skip
    for sc in scopes:
        for i, (p, s) in enumerate(shown_providers(sc)):
            _row(t, sc.name if i == 0 else "", p, *_count_cells(s))
    return _rendered(t)


def _scope_rates(kind: str, scopes: list[ScopeStats]) -> list[str]:
    user = kind == "user"
    lead = (kind, "group") if user else (kind,)
    t = _table(
        f"Per {'pilot user' if user else 'group'}: rates and latency (ms)",
        (*lead, "provider", "rate", "1st try", "p50", "p95", "max"),
        left=len(lead) + 1,
    )
    for sc in scopes:
        names = [sc.name, sc.group or ""] if user else [sc.name]
        for i, (p, s) in enumerate(shown_providers(sc)):
            lead_cells = names if i == 0 else [""] * len(names)
            _row(t, *lead_cells, p, *_rate_cells(s), *_latency_cells(s.latency_ms))
    return _rendered(t)


def _scopes(report: Report) -> list[str]:
    out = _scope_outcomes("group", report.groups) + _scope_rates("group", report.groups)
    if report.users:
        out += _scope_outcomes("user", report.users) + _scope_rates("user", report.users)
    return out


def _divergences(report: Report) -> list[str]:
    out = [
        f"Divergences: {len(report.divergences)} "
        "(pilot pairs one provider delivered and the other finally refused)"
    ]
    for d in report.divergences:
        out += _wrap(
            f"{d.received} {d.node} {d.queue_id} {d.rcpt} [{d.group}] refused by {d.refused_by}",
            "    ",
            "  ",
        )
        for p, o in (("legacy", d.legacy), ("new", d.new)):
            out += _wrap(f"{p:<6} {outcome_text(o)}: {reply_text(o)}", "        ", "    ")
    out.append("")
    return out


def _readiness(report: Report) -> list[str]:
    out = ["Readiness (pilot groups)"]
    if not report.verdicts:
        out.append("  no pilot groups")
    for v in report.verdicts:
        out += _wrap(f"{v.group}: {v.verdict.upper()} — {v.reason}", "    ", "  ")
    th = report.thresholds
    out += _wrap(
        f"thresholds: min_pairs {th.min_pairs}, min_delivery_ratio {th.min_delivery_ratio:g}, "
        f"max_p95_increase_ms {th.max_p95_increase_ms:g}, max_divergences {th.max_divergences}, "
        f"max_pending_ratio {th.max_pending_ratio:g}",
        "  ",
        "",
    )
    return out


def render_text(report: Report) -> str:
    """The text report: summary, provider tables, groups and users, divergences, verdicts."""
    from relay.report.placement_render import placement_text  # it builds on this module

    sections = (_header, _providers, _latency, _reasons, _scopes, _divergences, placement_text,
                _readiness)  # fmt: skip
    out = [line for section in sections for line in section(report)]
    return "\n".join(line.rstrip() for line in out) + "\n"
