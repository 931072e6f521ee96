"""DMARC (RFC 7489): the From domain's policy and whether SPF or DKIM aligns with it.

The organisational domain comes from the public suffix list that the
`publicsuffixlist` package ships (read offline; nothing is downloaded at run
time). Small enough to be ours: authheaders' DMARC passes `str` to its DNS hook
where dkimpy passes `bytes`, and would need a resolver of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses
from functools import cache

from publicsuffixlist import PublicSuffixList

from relay.auth.lookups import Lookups
from relay.auth.results import fields
from relay.config import ascii_domain
from relay.resolver import DnsFailure

POLICIES = ("none", "quarantine", "reject")


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organisational(domain: str) -> str:
    """The organisational domain (RFC 7489 §3.2): one label below the public suffix."""
    return _psl().privatesuffix(domain) or domain


def from_domain(section: bytes) -> str | None:
    """The RFC5322.From domain DMARC judges; None unless there is exactly one From
    field with exactly one address (RFC 7489 §6.6.1)."""
    found = [f for name, f in fields(section) if name == b"from"]
    if len(found) != 1:
        return None
    value = found[0].partition(b":")[2].replace(b"\r\n", b"").decode("utf-8", "replace")
    addresses = [a for _, a in getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = ascii_domain(addresses[0].rpartition("@")[2])
    return domain if domain.isascii() and "." in domain else None


@dataclass(frozen=True)
class Record:
    policy: str  # p=, or sp= for a subdomain's mail when found at the organisational domain
    strict_dkim: bool
    strict_spf: bool


def parse(text: str, subdomain: bool) -> Record | None:
    """A `v=DMARC1` record's tags; None when it is not one (RFC 7489 §6.6.3)."""
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    if tags.get("v") != "DMARC1" or not re.match(r"\s*v\s*=", text):
        return None
    policy = tags.get("p", "").lower()
    if subdomain and tags.get("sp", "").lower() in POLICIES:
        policy = tags["sp"].lower()
    if policy not in POLICIES:  # §6.6.3: no valid p= but rua= would mean "none"
        policy = "none"
    strict = {k: tags.get(k, "r").lower() == "s" for k in ("adkim", "aspf")}
    return Record(policy, strict["adkim"], strict["aspf"])


async def lookup(lookups: Lookups, from_domain: str) -> Record | None:
    """The policy for mail from `from_domain`: its own record, else its organisational
    domain's (§6.6.3); DnsFailure when either lookup failed."""
    org = organisational(from_domain)
    for name, subdomain in ((from_domain, False), (org, True)):
        if subdomain and name == from_domain:
            break
        texts = [t.decode("utf-8", "replace") for t in await lookups.txt(f"_dmarc.{name}")]
        records = [r for r in (parse(t, subdomain) for t in texts) if r is not None]
        if len(records) == 1:
            return records[0]
        if records:  # more than one: as if none (§6.6.3 step 4)
            return None
    return None


def aligned(domain: str, from_domain: str, strict: bool) -> bool:
    if strict:
        return domain == from_domain
    return organisational(domain) == organisational(from_domain)


async def policy(lookups: Lookups, from_domain: str | None) -> Record | DnsFailure | None:
    """`lookup`, with a failure as a value (it runs beside SPF and DKIM)."""
    if not from_domain:
        return None
    try:
        return await lookup(lookups, from_domain)
    except DnsFailure as exc:
        return exc


def evaluate(
    record: Record | DnsFailure | None, from_domain: str | None, spf: str,
    spf_domain: str | None, dkim: list[tuple[str, str]],
) -> tuple[str, str | None]:  # fmt: skip
    """(DMARC result, the policy that applied or None without a record)."""
    if isinstance(record, DnsFailure):
        return "temperror", None
    if record is None or not from_domain:  # no record, or no single From address
        return "none", None
    spf_ok = (
        spf == "pass"
        and bool(spf_domain)
        and aligned(spf_domain or "", from_domain, record.strict_spf)
    )
    dkim_ok = any(r == "pass" and aligned(d, from_domain, record.strict_dkim) for d, r in dkim)
    if spf_ok or dkim_ok:
        return "pass", record.policy
    if "temperror" in (spf, *(r for _, r in dkim)):  # a pass may have been missed
        return "temperror", record.policy
    return "fail", record.policy
