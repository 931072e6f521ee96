"""Our Authentication-Results header field (RFC 8601), and the removal of any
incoming one that claims our authserv-id (§5: a forgery, or our own from a loop).

Only domains appear in it (no local parts), and only as plain DNS tokens: a
name with any other character is left out, never copied into the header.
"""

from __future__ import annotations

import re

from relay.records import AuthVerdict

_TOKEN = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?")
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")


def _prop(name: str, value: str | None) -> str:
    return f" {name}={value}" if value and _TOKEN.fullmatch(value) else ""


def header(authserv: str, v: AuthVerdict, helo_identity: bool) -> bytes:
    """The field as prepended to both copies, folded, ending in CRLF."""
    identity = "smtp.helo" if helo_identity else "smtp.mailfrom"
    parts = [f"spf={v.spf}{_prop(identity, v.spf_domain)}"]
    parts += [f"dkim={r}{_prop('header.d', d)}" for d, r in v.dkim] or ["dkim=none"]
    policy = f" (p={v.dmarc_policy})" if v.dmarc_policy else ""
    parts.append(f"dmarc={v.dmarc}{policy}{_prop('header.from', v.from_domain)}")
    parts.append(f"arc={v.arc}")
    body = ";\r\n\t".join(parts)
    return f"Authentication-Results: {authserv};\r\n\t{body}\r\n".encode()


def authserv_id(value: bytes) -> bytes:
    """The authserv-id an Authentication-Results value starts with (comments dropped)."""
    text = value.replace(b"\r\n", b"")
    while _COMMENT.search(text):
        text = _COMMENT.sub(b" ", text)
    return text.split(b";", 1)[0].strip().split(None, 1)[0] if text.strip() else b""


def fields(section: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercased name, the whole field with its folded lines) for each field."""
    out = []
    for field in re.split(rb"(?<=\n)(?=[^ \t])", section):
        name, colon, _ = field.partition(b":")
        out.append((name.strip().lower() if colon else b"", field))
    return out


def strip_own(section: bytes, authserv: str) -> bytes:
    """The header section without the Authentication-Results fields of `authserv`."""
    own = authserv.lower().encode()
    return b"".join(
        field for name, field in fields(section)
        if name != b"authentication-results" or authserv_id(field.partition(b":")[2]).lower() != own
    )  # fmt: skip
