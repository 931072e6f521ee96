"""Divergences grouped by reply: a month of pilot traffic has hundreds, but few replies.

Two divergences fall in one group when they are of the same kind and the
refusing provider gave the same reply once queue ids, addresses, IP literals and
other digit-bearing tokens are set aside (`reply_pattern`). Text and HTML show
the worst groups (most divergences first) per kind; JSON lists every group and
every divergence (docs/report.md, "Divergences").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from relay.report.model import DIVERGENCE_KINDS, Divergence, DivergenceGroup

# Groups per kind shown in text and HTML (JSON and CSV have all).
SHOWN_PER_KIND = 20

_LEADING_CODES = re.compile(r"(?:^|\s)[245]\d\d[- ](?:[245]\.\d{1,3}\.\d{1,3}\s)?")
_VARIABLE = re.compile(
    r"[\w.+=-]+@[\w.-]+"  # an address (a Message-ID too)
    r"|\[[^\[\]]*\d[^\[\]]*\]"  # [IP], [host.prod.outlook.com], [InternalId=…]
    r"|\b(?=[\w.:/-]*\d)[\w.:/-]{6,}\b"  # ids, timestamps, IPs, session tokens
)


def reply_pattern(code: int | None, enhanced: str | None, reply: str | None) -> str:
    """The reply with what varies from one message to the next replaced by `…`."""
    text = _LEADING_CODES.sub(" ", reply or "")
    text = _VARIABLE.sub("…", text)
    return f"{code or '-'} {enhanced or '-'} {' '.join(text.split())}"


def group_divergences(
    divergences: Iterable[tuple[Divergence, str]],
) -> list[DivergenceGroup]:
    """Groups of (divergence, reply pattern) pairs, in received order, worst first per kind.

    The pattern comes with each divergence (computed on the reply as logged, so
    pseudonymized and plain reports group alike).
    """
    groups: dict[tuple[str, str], DivergenceGroup] = {}
    users: dict[tuple[str, str], set[str]] = {}
    for d, pattern in divergences:
        key = (d.kind, pattern)
        g = groups.get(key)
        o = d.refusal
        if g is None:
            g = groups[key] = DivergenceGroup(
                kind=d.kind,
                reason=o.reason or "other",
                smtp_code=o.smtp_code,
                enhanced_code=o.enhanced_code,
                reply=o.smtp_response or "",
                count=0,
                users=0,
                groups=[],
                first_received=d.received,
                last_received=d.received,
                examples=[],
            )
            users[key] = set()
        g.count += 1
        users[key].add(d.rcpt.lower())
        if d.group not in g.groups:
            g.groups.append(d.group)
        g.first_received = min(g.first_received, d.received)
        g.last_received = max(g.last_received, d.received)
        if len(g.examples) < 3:
            g.examples.append({"node": d.node, "queue_id": d.queue_id})
    for key, g in groups.items():
        g.users = len(users[key])
        g.groups.sort()
    order = {k: i for i, k in enumerate(DIVERGENCE_KINDS)}
    return sorted(
        groups.values(),
        key=lambda g: (order[g.kind], -g.count, _neg(g.last_received), g.reply),
    )


def _neg(ts: str) -> tuple[int, ...]:
    """Sort key for "latest first" on timestamps."""
    return tuple(-ord(c) for c in ts)


def worst(groups: list[DivergenceGroup], kind: str) -> tuple[list[DivergenceGroup], int, int]:
    """The groups of one kind shown (at most SHOWN_PER_KIND), and the groups and
    divergences left out."""
    of_kind = [g for g in groups if g.kind == kind]
    shown = of_kind[:SHOWN_PER_KIND]
    rest = of_kind[SHOWN_PER_KIND:]
    return shown, len(rest), sum(g.count for g in rest)
