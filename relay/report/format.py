"""Formatting shared by the report's outputs, so text, HTML and verdicts say it alike."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

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


def fmt_small_pct(ratio: float) -> str:
    """A small rate with up to two decimals: 0.0025 → "0.25 %" (divergence rates)."""
    v = round(ratio * 100, 2)
    return f"{v:g} %"


def num(v: float) -> int | float:
    """A whole float as an int, so JSON and CSV say 1500, not 1500.0."""
    return int(v) if float(v).is_integer() else v


def reply_text(o: Outcome) -> str:
    """An outcome's reply as `fmt_reply` shows it."""
    return fmt_reply(o.smtp_code, o.enhanced_code, o.smtp_response)


def fmt_reply(code: int | None, enhanced: str | None, response: str | None) -> str:
    """Code, enhanced code and reply text, without repeating what the reply starts with."""
    resp = response or ""
    head: list[str] = []
    if code is not None and not resp.startswith(str(code)):
        head.append(str(code))
        if enhanced and not resp.startswith(enhanced):
            head.append(enhanced)
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


def fmt_time(ts: str | None, tz: tzinfo, seconds: bool = False) -> str:
    """A log timestamp in the report's zone, "2026-11-25 10:00" ("-" if none)."""
    if not ts:
        return "-"
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    t = (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(tz)
    return t.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def kind_title(kind: str, labels: dict[str, str]) -> str:
    """What a divergence kind means, with the providers' labels."""
    legacy, new = labels["legacy"], labels["new"]
    return {
        "new_refused": f"refused by {new}, delivered by {legacy}",
        "cutover_refused": f"refused by {new} to cut-over users (no {legacy} copy)",
        "legacy_refused": f"refused by {legacy}, delivered by {new}",
    }[kind]


def joined_label(cls: str, labels: dict[str, str]) -> str:
    """A joined class in a table header: "both" (delivered), "Zoho Mail only"…"""
    return {
        "both_delivered": "both",
        "legacy_only": f"{labels['legacy']} only",
        "new_only": f"{labels['new']} only",
        "both_failed": "both failed",
        "pending": "pending",
    }[cls]


# How a pilot pair is observed (MODES), in one word for table cells.
MODE_LABELS = {"dual": "dual", "forwarded": "forwarded", "cutover": "cut-over", "paused": "paused"}
