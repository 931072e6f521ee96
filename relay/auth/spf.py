"""SPF (RFC 7208) with pyspf, its DNS through our resolver.

pyspf looks names up through its module-level `DNSLookup`; that is replaced
once by a dispatcher to the calling thread's `Probe`, so each check runs on
its own message's deadline (pyspf is pinned below 2.1 for that name).
"""

from __future__ import annotations

import threading
from typing import Any

import spf

from relay.auth.lookups import Probe
from relay.resolver import DnsFailure

_current = threading.local()


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 0) -> list[Any]:
    """pyspf's DNSLookup: [((name, type), value)] as its dnspython variant returns them."""
    probe: Probe = _current.probe
    try:
        records = probe.records(name, qtype)
    except DnsFailure as exc:
        raise spf.TempError(f"DNS {exc}") from None
    out: list[Any] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            value: Any = r.address
        elif qtype == "MX":
            value = (r.preference, r.exchange.to_text(omit_final_dot=True))
        elif qtype == "PTR":
            value = r.target.to_text(omit_final_dot=True)
        else:  # TXT (type SPF is obsolete: RFC 7208 §3.1, never asked for here)
            value = tuple(r.strings)
        out.append(((name, qtype), value))
    return out


spf.DNSLookup = _lookup


def identity(mail_from: str, helo: str) -> str:
    """The domain SPF checks: MAIL FROM's, or the HELO name for the null sender."""
    return mail_from.rpartition("@")[2].lower() if mail_from else helo.lower()


def check(probe: Probe, client_ip: str, mail_from: str, helo: str) -> str:
    """The SPF result (pass, fail, softfail, neutral, none, temperror, permerror).

    Runs in a worker thread; the deadline is the probe's."""
    _current.probe = probe
    try:
        result, _code, _why = spf.query(i=client_ip, s=mail_from, h=helo, querytime=0).check()
    except (ValueError, spf.PermError):  # an unusable client IP or HELO name
        return "permerror"
    finally:
        _current.probe = None
    return str(result)
