"""The provider's own verdict on a copy, read from the header fields the probe fetches.

Only what was present is kept: `spf`, `dkim`, `dmarc`, `compauth` from the
topmost Authentication-Results (RFC 8601: the provider prepends its own, so the
first one holding a method is the nearest), `scl` and `sfv` from Microsoft's
X-Forefront-Antispam-Report, and SpamAssassin-style `X-Spam-Flag` /
`X-Spam-Status` (`spam_flag`, `spam_status`, `spam_score`).
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Any

AUTH_METHODS = ("spf", "dkim", "dmarc", "compauth")
# RFC 8601 resinfo: `method[/version]=result`; comments in parentheses are removed first
_RESINFO = re.compile(r"(?:^|[;\s])([A-Za-z][\w-]*)(?:/\d+)?\s*=\s*([A-Za-z]+)")
_COMMENT = re.compile(r"\([^()]*\)")
_SCORE = re.compile(r"\b(?:score|hits)=(-?\d+(?:\.\d+)?)")


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value)


def auth_results(values: list[str]) -> dict[str, str]:
    """The first result of each method across Authentication-Results headers, in order."""
    out: dict[str, str] = {}
    for raw in values:
        text = _unfold(raw)
        while _COMMENT.search(text):
            text = _COMMENT.sub(" ", text)
        # the authserv-id comes before the first ";"
        _, _, results = text.partition(";")
        for method, result in _RESINFO.findall(results):
            m = method.lower()
            if m in AUTH_METHODS and m not in out:
                out[m] = result.lower()
    return out


def forefront(value: str) -> dict[str, Any]:
    """`SCL:5;SFV:SPM;...` → {"scl": 5, "sfv": "SPM"} (only the fields present)."""
    out: dict[str, Any] = {}
    for part in _unfold(value).split(";"):
        key, sep, val = part.partition(":")
        key, val = key.strip().upper(), val.strip()
        if not sep or not val:
            continue
        if key == "SCL":
            try:
                out["scl"] = int(val)
            except ValueError:
                continue
        elif key == "SFV":
            out["sfv"] = val
    return out


def spam_headers(flag: str | None, status: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if flag is not None:
        out["spam_flag"] = flag.strip().lower().startswith("yes")
    if status is not None:
        text = _unfold(status).strip()
        out["spam_status"] = "yes" if text.lower().startswith("yes") else "no"
        m = _SCORE.search(text)
        if m:
            out["spam_score"] = float(m.group(1))
    return out


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def parse_verdict(headers: Message) -> dict[str, Any]:
    """The verdict dict of one copy, from its parsed header fields."""
    results = [str(v) for v in headers.get_all("Authentication-Results") or []]
    verdict: dict[str, Any] = dict(auth_results(results))
    ff = headers.get("X-Forefront-Antispam-Report")
    if ff is not None:
        verdict.update(forefront(str(ff)))
    flag, status = headers.get("X-Spam-Flag"), headers.get("X-Spam-Status")
    verdict.update(spam_headers(_text(flag), _text(status)))
    return verdict
