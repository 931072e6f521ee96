"""Formatting shared by the report's outputs, so text, HTML and verdicts say it alike."""

from __future__ import annotations

from relay.report.model import Outcome, ProviderStats, ScopeStats
from relay.report.reasons import REASON_LABELS


def fmt_int(v: int) -> str:
    return f"{v:,}"


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_pct(ratio: float) -> str:
    """A ratio as a percentage with at most one decimal: 0.995 → "99.5 %", 1 → "100 %"."""
    v = round(ratio * 100, 1)
    return f"{v:g} %"


def num(v: float) -> int | float:
    """A whole float as an int, so JSON and CSV say 1500, not 1500.0."""
    return int(v) if float(v).is_integer() else v


def reply_text(o: Outcome) -> str:
    """Code, enhanced code and reply text, without repeating what the reply starts with."""
    resp = o.smtp_response or ""
    head: list[str] = []
    if o.smtp_code is not None and not resp.startswith(str(o.smtp_code)):
        head.append(str(o.smtp_code))
        if o.enhanced_code and not resp.startswith(o.enhanced_code):
            head.append(o.enhanced_code)
    return " ".join([*head, resp]).strip() or "-"


def outcome_text(o: Outcome) -> str:
    """The outcome with its reason class, e.g. "bounced (spam/content)"."""
    if not o.outcome:
        return "not planned"
    why = f" ({REASON_LABELS[o.reason]})" if o.reason else ""
    return f"{o.outcome}{why}"


def shown_providers(sc: ScopeStats) -> list[tuple[str, ProviderStats]]:
    """The providers planned in a scope (at least one row): a scope's rows in the tables."""
    shown = [(p, s) for p, s in sc.providers.items() if s.planned]
    return shown or list(sc.providers.items())[:1]
