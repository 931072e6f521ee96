"""The plain mailbox form, `dot-atom@dot-atom` in ASCII, that nearly every address
takes: recognised by one regex, so the hot path can skip `email`'s parsers
(which give the same answer for it, and are kept for every other form)."""

from __future__ import annotations

import re

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
PLAIN_MAILBOX = re.compile(PLAIN)
