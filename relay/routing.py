"""Where a recipient's mail goes: a pure function of (recipient, pilot list, now).

Matching follows Postfix lookup tables: the full address (with its extension),
then the address without it, then `*@domain`; case-insensitive; the domain is
in its ASCII form (`config.ascii_domain`) in `delivered_to` while the local
part keeps the client's spelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from relay.config import PilotEntry, PilotFile, PilotMode, RelaySettings, ascii_domain
from relay.records import Role

Provider = Literal["legacy", "new"]  # routed to; DSNs go to the bounce host


@dataclass(frozen=True)
class Delivery:
    provider: Provider
    delivered_to: str
    role: Role
    group: str | None
    mode: PilotMode | None
    pilot: bool


@dataclass(frozen=True)
class Route:
    recipient: str
    deliveries: tuple[Delivery, ...]
    entry: str | None  # the pilot entry that decided, as written in the file
    forwarded: bool

    @property
    def discarded(self) -> bool:
        return not self.deliveries


@dataclass(frozen=True)
class PilotTable:
    """The pilot file compiled for lookups; rebuilt whenever the file changes."""

    exact: Mapping[str, PilotEntry]
    wildcard: Mapping[str, PilotEntry]
    new_domains: Mapping[str, str]
    delimiter: str
    default_domain: str

    @classmethod
    def build(cls, pilots: PilotFile, relay: RelaySettings) -> PilotTable:
        exact: dict[str, PilotEntry] = {}
        wildcard: dict[str, PilotEntry] = {}
        for e in pilots.pilots:
            local, _, domain = e.address.rpartition("@")
            domain = ascii_domain(domain)
            if local == "*":
                wildcard.setdefault(domain, e)
            else:
                exact.setdefault(f"{local.lower()}@{domain}", e)
        return cls(
            exact, wildcard, dict(pilots.new_domains), relay.recipient_delimiter, relay.domains[0]
        )


def split_address(address: str, default_domain: str) -> tuple[str, str]:
    """(local part as written, domain in its ASCII form); bare `postmaster`: the default domain."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, default_domain
    return local, ascii_domain(domain)


def _split_tag(local: str, delimiter: str) -> tuple[str, str]:
    if delimiter and delimiter in local:
        base, _, tag = local.partition(delimiter)
        if base:
            return base, delimiter + tag
    return local, ""


def lookup(local: str, domain: str, table: PilotTable) -> PilotEntry | None:
    full = f"{local.lower()}@{domain}"
    if full in table.exact:
        return table.exact[full]
    base, tag = _split_tag(local, table.delimiter)
    if tag and f"{base.lower()}@{domain}" in table.exact:
        return table.exact[f"{base.lower()}@{domain}"]
    return table.wildcard.get(domain)


def effective_mode(entry: PilotEntry, now: datetime) -> PilotMode:
    if entry.mode == "dual" and entry.cutover_at is not None and now >= entry.cutover_at:
        return "new-only"
    return entry.mode


def new_address(local: str, domain: str, entry: PilotEntry, table: PilotTable) -> str:
    _, tag = _split_tag(local, table.delimiter)
    if entry.new_address:
        n_local, n_domain = split_address(entry.new_address, domain)
        # The tag survives the rewrite; an exact entry written with a tag has none to add.
        if entry.address.lower() == f"{local.lower()}@{domain}":
            tag = ""
        return f"{n_local}{tag}@{n_domain}"
    return f"{local}@{table.new_domains[domain]}"


def route(recipient: str, table: PilotTable, now: datetime, forwarded: bool = False) -> Route:
    """The deliveries for one recipient (SPEC "Routing" table)."""
    local, domain = split_address(recipient, table.default_domain)
    address = f"{local}@{domain}"
    entry = lookup(local, domain, table)
    if entry is None:
        legacy = (Delivery("legacy", address, "primary", None, None, False),)
        return Route(address, () if forwarded else legacy, None, forwarded)
    mode = effective_mode(entry, now)
    group = entry.group
    to_legacy = Delivery("legacy", address, "primary", group, mode, True)

    def to_new(role: Role) -> Delivery:
        return Delivery("new", new_address(local, domain, entry, table), role, group, mode, True)

    deliveries: tuple[Delivery, ...]
    if forwarded:
        deliveries = (to_new("shadow"),) if mode in ("dual", "new-only") else ()
    elif mode == "dual":
        deliveries = (to_legacy, to_new("shadow"))
    elif mode == "new-only":
        deliveries = (to_new("primary"),)
    else:
        deliveries = (to_legacy,)
    return Route(address, deliveries, entry.address, forwarded)


def resolve_recipient(address: str, relay: RelaySettings) -> tuple[str, bool] | None:
    """The address to route and whether it is a forwarded copy; None = relaying denied.

    Refuses every classic relay trick: `%` and `!` routing, a quoted `@`, IP
    literals, and any domain (look-alikes, subdomains) not listed exactly.
    """
    local, domain = split_address(address, relay.domains[0])
    if not local or any(c in local for c in "%!@"):
        return None
    if domain in relay.domains:
        return f"{local}@{domain}", False
    if domain in relay.forward_domains:
        return f"{local}@{relay.forward_domains[domain]}", True
    return None
