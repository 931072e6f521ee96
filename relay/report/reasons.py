"""Reason classes of refusals and deferrals: one table, first matching row wins.

The report counts bounced pairs and deferred attempts per class (docs/report.md,
"Reason classes"); `classify_reason` is the only way in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ReasonRule:
    """One row of the rejection-reason table: first matching row wins.

    `codes` are enhanced-code "subject.detail" pairs (the class digit 4/5 is
    ignored). With `need_both` the code AND the text must match, else either.
    """

    reason: str
    codes: frozenset[str]
    text: re.Pattern[str] | None
    need_both: bool = False

    def matches(self, code: str | None, text: str) -> bool:
        code_ok = code is not None and code in self.codes
        text_ok = self.text is not None and self.text.search(text) is not None
        return (code_ok and text_ok) if self.need_both else (code_ok or text_ok)


# Display label of each reason class, in display order. Keys are stable (JSON).
REASON_LABELS: dict[str, str] = {
    "spam_content": "spam/content",
    "auth_policy": "authentication policy",
    "unknown_user": "unknown user",
    "size": "size",
    "rate_limit": "rate limit",
    "relay": "refused by the relay",  # `by: relay`: the relay decided, not the provider
    "other": "other",
}
REASONS: tuple[str, ...] = tuple(REASON_LABELS)
# Position of each class in the per-class counter lists of the aggregation.
REASON_INDEX: dict[str, int] = {r: i for i, r in enumerate(REASONS)}

_I = re.IGNORECASE
REASON_RULES: tuple[ReasonRule, ...] = (
    ReasonRule(
        "auth_policy",
        frozenset({"7.20", "7.21", "7.22", "7.23", "7.24", "7.25", "7.26"}),
        re.compile(r"\b(spf|dkim|dmarc)\b|unauthenticated|sender authentication", _I),
    ),
    ReasonRule(
        "unknown_user",
        frozenset({"1.0", "1.1", "1.10"}),
        re.compile(
            r"user unknown|unknown (user|recipient|mailbox)|no such (user|mailbox|recipient)"
            r"|does ?n[o']t exist|recipient not found|mailbox not found|invalid recipient",
            _I,
        ),
    ),
    ReasonRule(
        "size",
        frozenset({"3.4", "2.3"}),
        re.compile(r"too (large|big)|size limit|exceeds? .{0,30}size|message size", _I),
    ),
    ReasonRule(
        "rate_limit",
        frozenset({"7.28"}),
        re.compile(r"rate.?limit|\brate\b|too many|throttl|slow down", _I),
    ),
    ReasonRule(
        "spam_content",
        frozenset(),
        re.compile(
            r"spam|junk|virus|malware|phish|unsolicited|bulk mail|block ?list|black ?list"
            r"|blocked|reputation|content",
            _I,
        ),
    ),
    ReasonRule("spam_content", frozenset({"7.0", "7.1"}), re.compile(r"policy", _I), True),
)

_ENHANCED_RE = re.compile(r"\b[245]\.(\d{1,3}\.\d{1,3})\b")


_reason_cache: dict[tuple[str | None, str | None], str] = {}


def classify_reason(enhanced_code: str | None, smtp_response: str | None, by: object = None) -> str:
    """The reason class of a refusal or deferral: `relay` for one the relay made
    (`by: relay` in the event), else the first matching REASON_RULES row."""
    if by == "relay":
        return "relay"
    if not isinstance(enhanced_code, str):
        enhanced_code = None
    if not isinstance(smtp_response, str):
        smtp_response = None
    key = (enhanced_code, smtp_response)
    hit = _reason_cache.get(key)
    if hit is None:
        if len(_reason_cache) >= 4096:  # replies carrying ids rarely repeat: stay bounded
            _reason_cache.clear()
        hit = _reason_cache[key] = _classify(enhanced_code, smtp_response)
    return hit


def _classify(enhanced_code: str | None, smtp_response: str | None) -> str:
    text = smtp_response or ""
    m = _ENHANCED_RE.search(enhanced_code or "") or _ENHANCED_RE.search(text)
    code = m.group(1) if m else None
    for rule in REASON_RULES:
        if rule.matches(code, text):
            return rule.reason
    return "other"
