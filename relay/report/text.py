"""`relay report` (text): aligned tables readable at 100 columns, no colour.

One function per section, in the order they are printed: the verdicts first,
then the pilot comparison (both providers on the same pilot pairs), the
divergences grouped by reply, and last the all-traffic tables, each titled with
its population. Tables are drawn by rich on a colourless console of TEXT_WIDTH
columns; providers are shown by their labels.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from relay.report.completeness import completeness_sentences
from relay.report.divergences import SHOWN_PER_KIND, worst
from relay.report.format import (
    MODE_LABELS,
    fmt_int,
    fmt_ms,
    fmt_rate,
    fmt_reply,
    fmt_small_pct,
    fmt_time,
    joined_label,
    kind_title,
    shown_providers,
)
from relay.report.inputs import check_tz
from relay.report.model import (
    DIVERGENCE_KINDS,
    JOINED,
    Comparison,
    Latency,
    ProviderStats,
    Report,
    ScopeStats,
)
from relay.report.reasons import REASON_LABELS

TEXT_WIDTH = 100
ALL_PILOTS = "all pilots"


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
    tz = check_tz(report.tz)
    out = ["relay report", f"providers: {providers_title(report.labels)}"]
    out += _wrap(f"logs: {', '.join(inp.files) or '-'}", "  ", "")
    out.append(
        f"filters: since {fmt_time(flt.get('since'), tz)}, until {fmt_time(flt.get('until'), tz)} "
        f"(exclusive), group {flt.get('group') or '-'}; times in {report.tz}"
    )
    out.append(f"received: {fmt_time(tot.first_received, tz)} .. {fmt_time(tot.last_received, tz)}")
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
    if report.pseudonymized:
        out.append("  pseudonymized: local parts and Message-IDs are keyed hashes (`relay hash`)")
    for err in inp.errors:
        out += _wrap(f"warning: {err}", "  ", "")
    out.append("")
    return out


def providers_title(labels: dict[str, str]) -> str:
    """ "legacy vs new", or with labels "Zoho Mail (legacy) vs Microsoft 365 (new)"."""
    return " vs ".join(labels[p] if labels[p] == p else f"{labels[p]} ({p})" for p in labels)


def _readiness(report: Report) -> list[str]:
    out = ["Readiness per pilot group"]
    if not report.verdicts:
        out.append("  no pilot groups")
    for v in report.verdicts:
        out += _wrap(f"{v.group}: {v.verdict.upper()} — {v.reason}", "    ", "  ")
    th = report.thresholds
    out += _wrap(
        f"thresholds: min_pairs {th.min_pairs}, min_delivery_ratio {th.min_delivery_ratio:g}, "
        f"max_p95_increase_ms {th.max_p95_increase_ms:g}, "
        f"max_divergence_rate {th.max_divergence_rate:g}, "
        f"max_pending_ratio {th.max_pending_ratio:g}",
        "  ",
        "",
    )
    out.append("")
    return out


def pilot_scopes(report: Report) -> list[tuple[str, Comparison]]:
    """(name, comparison) of each pilot group, then of all pilot pairs."""
    rows = [(g.name, g.comparison) for g in report.groups if g.comparison is not None]
    return [*rows, (ALL_PILOTS, report.comparison)]


def _comparison(report: Report) -> list[str]:
    labels = report.labels
    t = _table(
        "Pilot comparison per group: compared pairs (pilot pairs both providers got, both "
        "final); latency over the pairs both delivered (ms)",
        ("group", "provider", "compared", "delivered", "refused", "rate", "p50", "p95", "max"),
        left=2,
    )
    for name, c in pilot_scopes(report):
        for i, (p, side) in enumerate(c.providers.items()):
            _row(
                t, name if i == 0 else "", labels[p], fmt_int(c.compared_pairs),
                fmt_int(side.delivered), fmt_int(side.refused), fmt_rate(side.delivery_rate),
                *_latency_cells(side.latency_ms),
            )  # fmt: skip
    out = _rendered(t)
    t = _table(
        f"Pilot divergences per group: rate = (refused by {labels['new']} + refused to cut-over "
        "users) / judged pairs (compared + cut-over)",
        ("group", "judged", f"{labels['new']} refused", "cut-over refused", "rate",
         f"{labels['legacy']} refused", "pending"),
    )  # fmt: skip
    for name, c in pilot_scopes(report):
        d = c.divergences
        _row(
            t, name, fmt_int(c.judged_pairs), fmt_int(d["new_refused"]),
            fmt_int(d["cutover_refused"]), _small(c.divergence_rate),
            fmt_int(d["legacy_refused"]), fmt_int(c.pending_pairs),
        )  # fmt: skip
    out += _rendered(t)
    out += _joined_table(
        "Pilot pairs per group by joined class (who delivered them), per mode",
        "group", pilot_scopes(report), labels,
    )  # fmt: skip
    return out


def _small(rate: float | None) -> str:
    return "-" if rate is None else fmt_small_pct(rate)


def joined_rows(c: Comparison) -> list[tuple[str, dict[str, int]]]:
    """(how observed, joined counts) of the modes a scope has, then "all" if several."""
    rows = [(MODE_LABELS[m], n) for m, n in c.joined_by_mode.items() if any(n.values())]
    return [*rows, ("all", c.joined)] if len(rows) > 1 else rows


def _joined_table(
    title: str, kind: str, scopes: list[tuple[str, Comparison]], labels: dict[str, str]
) -> list[str]:
    t = _table(title, (kind, "mode", *(joined_label(j, labels) for j in JOINED)), left=2)
    for name, c in scopes:
        for i, (mode, counts) in enumerate(joined_rows(c)):
            _row(t, name if i == 0 else "", mode, *(fmt_int(counts[j]) for j in JOINED))
    return _rendered(t)


def _authentication(report: Report) -> list[str]:
    """By authentication (each provider's figures per class) and the fairness table."""
    if not report.by_auth:
        return [f"By authentication: none ({report.fairness.absent})", ""]
    t = _table(
        "By authentication (the class the relay gave the message at ingress): outcomes",
        ("class", "provider", "planned", "delivered", "bounced", "expired", "deleted",
         "pending", "deferrals", "rate", "1st try"),
        left=2,
    )  # fmt: skip
    r = _table(
        "By authentication: reason classes of bounced pairs",
        ("class", "provider", *REASON_LABELS.values()),
        left=2,
    )
    for sc in report.by_auth:
        for i, (p, st) in enumerate(shown_providers(sc)):
            _row(t, sc.name if i == 0 else "", p, *_count_cells(st), *_rate_cells(st))
            _row(
                r, sc.name if i == 0 else "", p, *(fmt_int(st.rejections[k]) for k in REASON_LABELS)
            )
    out = _rendered(t) + _rendered(r)
    fair = report.fairness
    if fair.absent:
        return [*out, *_wrap(f"Fairness: no table: {fair.absent}."), ""]
    f = _table(
        "Fairness: the providers' own verdicts on mail the relay judged aligned_pass",
        ("provider", "aligned_pass", "spf fail", "dmarc fail", "compauth fail", "any fail", "rate"),
    )
    for row in fair.rows:
        _row(f, row.provider, fmt_int(row.aligned_pass),
             *(fmt_int(row.fails[k]) for k in ("spf", "dmarc", "compauth")),
             fmt_int(row.any_fail), fmt_rate(row.any_fail_rate))  # fmt: skip
    out += _rendered(f)
    for row in fair.rows:
        if row.note:
            out += [*_wrap(row.note, "  ", ""), ""]
    return out


def _divergences(report: Report) -> list[str]:
    tz = check_tz(report.tz)
    n = len(report.divergences)
    out = _wrap(
        f"Divergences: {fmt_int(n)} (pilot pairs one provider delivered and the other finally "
        f"refused, and cut-over users' mail refused by {report.labels['new']}); by reply, the "
        f"{SHOWN_PER_KIND} most frequent per kind; the JSON and CSV list every one",
    )
    for kind in DIVERGENCE_KINDS:
        of_kind = [g for g in report.divergence_groups if g.kind == kind]
        if not of_kind:
            continue
        total = sum(g.count for g in of_kind)
        out += _wrap(
            f"{kind_title(kind, report.labels)}: {fmt_int(total)} in "
            f"{fmt_int(len(of_kind))} repl{'y' if len(of_kind) == 1 else 'ies'}",
            "    ",
            "  ",
        )
        shown, more, more_count = worst(report.divergence_groups, kind)
        for g in shown:
            reply = fmt_reply(g.smtp_code, g.enhanced_code, g.reply)
            out += _wrap(
                f"{fmt_int(g.count):>7}  {REASON_LABELS.get(g.reason, g.reason)} · {reply}",
                " " * 13,
                "    ",
            )
            example = ", ".join(f"{e['node']} {e['queue_id']}" for e in g.examples[:1])
            out += _wrap(
                f"{fmt_int(g.users)} user{'' if g.users == 1 else 's'}; {', '.join(g.groups)}; "
                f"{fmt_time(g.first_received, tz)} .. {fmt_time(g.last_received, tz)}; "
                f"e.g. {example}",
                " " * 13,
            )
        if more:
            out.append(
                f"    … {fmt_int(more)} more repl{'y' if more == 1 else 'ies'} "
                f"({fmt_int(more_count)} divergences): see the JSON or CSV"
            )
    out.append("")
    return out


def _providers(report: Report) -> list[str]:
    t = _table(
        f"Per provider, all traffic (unit: message × recipient; each provider's own pairs: "
        f"{report.labels['legacy']}'s include non-pilot mail, {report.labels['new']}'s are "
        "pilots' only)",
        ("provider", "planned", "delivered", "bounced", "expired", "deleted", "pending",
         "deferrals", "rate", "1st try"),
    )  # fmt: skip
    for p, s in report.providers.items():
        _row(t, report.labels[p], *_count_cells(s), *_rate_cells(s))
    return _rendered(t)


def _latency(report: Report) -> list[str]:
    t = _table(
        "Latency, all traffic (ms)",
        ("provider", "count", "p50", "p95", "max"),
    )
    for p, s in report.providers.items():
        lat = s.latency_ms
        _row(t, report.labels[p], fmt_int(lat.count), *_latency_cells(lat))
    return _rendered(t)


def _reasons(report: Report) -> list[str]:
    t = _table(
        "Reason classes, all traffic (bounced pairs; deferred attempts)",
        ("class", "provider", "bounced", "deferred"),
        left=2,
    )
    for r, label in REASON_LABELS.items():
        for i, (p, s) in enumerate(report.providers.items()):
            _row(t, label if i == 0 else "", report.labels[p], fmt_int(s.rejections[r]),
                 fmt_int(s.deferral_reasons[r]))  # fmt: skip
    return _rendered(t)


def scope_title(kind: str, what: str) -> str:
    """Title of an all-traffic scope table (also the HTML caption)."""
    if kind == "user":
        return f"Per pilot user: {what}"
    return f"Per group, all traffic: {what}"


def _scope_outcomes(kind: str, scopes: list[ScopeStats], labels: dict[str, str]) -> list[str]:
    t = _table(
        scope_title(kind, "outcomes"),
        (kind, "provider", "planned", "delivered", "bounced", "expired", "deleted",
         "pending", "deferrals"),
        left=2,
    )  # fmt: skip
    for sc in scopes:
        for i, (p, s) in enumerate(shown_providers(sc)):
            _row(t, sc.name if i == 0 else "", labels[p], *_count_cells(s))
    return _rendered(t)


def _scope_rates(kind: str, scopes: list[ScopeStats], labels: dict[str, str]) -> list[str]:
    user = kind == "user"
    lead = (kind, "group") if user else (kind,)
    t = _table(
        scope_title(kind, "rates and latency (ms)"),
        (*lead, "provider", "rate", "1st try", "p50", "p95", "max"),
        left=len(lead) + 1,
    )
    for sc in scopes:
        names = [sc.name, sc.group or ""] if user else [sc.name]
        for i, (p, s) in enumerate(shown_providers(sc)):
            lead_cells = names if i == 0 else [""] * len(names)
            _row(t, *lead_cells, labels[p], *_rate_cells(s), *_latency_cells(s.latency_ms))
    return _rendered(t)


def _groups(report: Report) -> list[str]:
    return _scope_outcomes("group", report.groups, report.labels) + _scope_rates(
        "group", report.groups, report.labels
    )


def _users(report: Report) -> list[str]:
    if not report.users:
        return []
    labels = report.labels
    scopes = [(u.name, u.comparison) for u in report.users if u.comparison is not None]
    out = _joined_table("Per pilot user: pilot pairs by joined class", "user", scopes, labels)
    return (
        out
        + _scope_outcomes("user", report.users, labels)
        + _scope_rates("user", report.users, labels)
    )


def _completeness(report: Report) -> list[str]:
    """New's copies of what legacy delivered, live or replayed (relay/report/completeness.py)."""
    out = ["Completeness (pilot pairs legacy delivered that new holds)"]
    since = report.filters.get("since") or report.totals.first_received
    for sentence in completeness_sentences(report.completeness, since):
        out += _wrap(sentence, "    ", "  ")
    if not report.completeness:
        out.append("  no pilot pairs delivered by legacy")
    out.append("")
    return out


def render_text(report: Report) -> str:
    """The text report: verdicts, pilot comparison, divergences, placement, then all traffic
    and users."""
    from relay.report.canaries import canaries_text
    from relay.report.placement_render import placement_text  # it builds on this module

    sections = (
        _header, _readiness, _comparison, _completeness, _divergences, placement_text,
        _providers, _latency, _reasons, _groups, _users, _authentication,
    )  # fmt: skip
    out = [line for section in sections for line in section(report)]
    out += canaries_text(report.canaries)
    return "\n".join(line.rstrip() for line in out) + "\n"
