"""DKIM (RFC 6376): every signature of a message, with dkimpy.

dkimpy answers a bool per signature; the probe tells a DNS failure
(`temperror`) and a missing key record (`permerror`) from a signature that
does not verify (`fail`). An unsigned message has no result at all (RFC 8601's
`dkim=none`), not authheaders' `dkim=fail`.
"""

from __future__ import annotations

import logging
import re

import dkim

from relay.auth.lookups import Lookups

QUIET = logging.getLogger("relay.auth.dkimpy")  # dkimpy logs every failure at ERROR
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False

_SIGNATURE = re.compile(rb"(?im)^dkim-signature:((?:[^\r\n]|\r\n[ \t])*)")
_DOMAIN = re.compile(rb"(?:^|;)\s*d\s*=\s*([^;\s]+)")


def signature_domains(header: bytes) -> list[str]:
    """The d= of each DKIM-Signature in a header section, "" where it has none."""
    out = []
    for m in _SIGNATURE.finditer(header):
        d = _DOMAIN.search(re.sub(rb"\r\n[ \t]", b" ", m.group(1)))
        out.append(d.group(1).decode("ascii", "replace").lower() if d else "")
    return out


def verify(lookups: Lookups, message: bytes) -> list[tuple[str, str]]:
    """(domain, result) for each DKIM-Signature, top first. Runs in a worker thread."""
    domains = signature_domains(message.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    if not domains:
        return []
    checker = dkim.DKIM(message, logger=QUIET, minkey=1024)
    results = []
    for idx, domain in enumerate(domains):
        probe = lookups.probe()
        try:
            checker.verify_headerprep(idx)
        except dkim.DKIMException:  # a malformed signature: its tags, not the message
            results.append((domain, "permerror"))
            continue
        try:
            ok = checker.verify(idx, dnsfunc=probe.dkim_txt)
        except dkim.DKIMException:  # the body hash differs, a bad c= or key
            ok = False
        if ok:
            results.append((domain, "pass"))
        elif probe.failed:
            results.append((domain, "temperror"))
        elif probe.missing:
            results.append((domain, "permerror"))  # no key record (RFC 6376 §6.1.2)
        else:
            results.append((domain, "fail"))
    return results
