"""Pseudonyms for addresses and Message-IDs: keyed hashes that stay stable across runs.

Used by `relay report --pseudonymize` (a report that can be sent to a vendor) and
by `log_privacy: hash` (delivery logs without addresses in clear), so that one
key gives the same pseudonym everywhere and `relay hash ADDR` finds a user in
either. A local part becomes the first 10 hex digits of HMAC-SHA-256(key, local
part lowercased); the domain stays (lowercased), so per-domain figures survive.
A Message-ID `<left@right>` is hashed like an address inside its brackets, which
is also what a reply quoting it gets (Microsoft 365 quotes it in its 250).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

KEY_ENV = "RELAY_PSEUDONYM_KEY"
HASH_DIGITS = 10

# An address in free text (a reply quoting the recipient or a Message-ID).
_ADDRESS_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
# Event fields holding one address, a list of addresses, free text, a Message-ID.
_ADDRESS_FIELDS = ("rcpt", "delivered_to", "mail_from")
_TEXT_FIELDS = ("smtp_response", "reason")
_CACHE_SIZE = 65536


class PseudonymKeyMissing(Exception):
    """`$RELAY_PSEUDONYM_KEY` is unset or empty."""

    def __str__(self) -> str:
        return f"environment variable {KEY_ENV} is not set (the pseudonym key)"


class Pseudonymizer:
    """Replaces local parts and Message-IDs by HMAC-SHA-256 pseudonyms (10 hex digits)."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise PseudonymKeyMissing
        self._key = key
        self._tokens: dict[str, str] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Pseudonymizer:
        return cls(environ.get(KEY_ENV, "").encode("utf-8"))

    def token(self, text: str) -> str:
        """The pseudonym of one (already lowercased) local part."""
        hit = self._tokens.get(text)
        if hit is None:
            if len(self._tokens) >= _CACHE_SIZE:
                self._tokens.clear()
            digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()
            hit = self._tokens[text] = digest[:HASH_DIGITS]
        return hit

    def address(self, addr: str) -> str:
        """`Local@Domain` → `<token>@domain`; "" (the null sender) stays ""."""
        if not addr:
            return addr
        local, at, domain = addr.rpartition("@")
        if not at:  # no domain (`postmaster`): the whole string is the local part
            return self.token(addr.lower())
        return f"{self.token(local.lower())}@{domain.lower()}"

    def message_id(self, mid: str) -> str:
        """`<left@right>` → `<token@right>` (the same as an address inside the brackets)."""
        inner = mid.strip()
        if inner.startswith("<") and inner.endswith(">"):
            inner = inner[1:-1]
        return f"<{self.address(inner)}>"

    def text(self, text: str, locals_: Iterable[str] = ()) -> str:
        """Free text with every address in it hashed, and the given local parts too."""
        out = _ADDRESS_RE.sub(lambda m: self.address(m.group(0)), text)
        for local in {x.lower() for x in locals_ if len(x) >= 3}:
            pattern = rf"(?<![\w.+@-]){re.escape(local)}(?![\w+@-])"
            out = re.sub(pattern, self.token(local), out, flags=re.IGNORECASE)
        return out

    def event(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A log event's fields with every address, Message-ID and quoted address hashed."""
        out = dict(fields)
        locals_ = [
            v.rpartition("@")[0]
            for k in ("rcpt", "delivered_to")
            if isinstance(v := fields.get(k), str)
        ]
        for k in _ADDRESS_FIELDS:
            v = out.get(k)
            if isinstance(v, str):
                out[k] = self.address(v)
        for k in _TEXT_FIELDS:
            v = out.get(k)
            if isinstance(v, str):
                out[k] = self.text(v, locals_)
        mid = out.get("message_id")
        if isinstance(mid, str):
            out["message_id"] = self.message_id(mid)
        rcpts = out.get("rcpts")
        if isinstance(rcpts, list):
            out["rcpts"] = [self.address(r) if isinstance(r, str) else r for r in rcpts]
        plan = out.get("plan")
        if isinstance(plan, list):
            out["plan"] = [self.event(e) if isinstance(e, dict) else e for e in plan]
        return out
