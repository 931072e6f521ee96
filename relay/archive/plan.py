"""Which accepted messages are archived: an `archive` entry in the routing plan.

The archive is a destination like a provider, so the scheduler writes it and a
message leaves the spool only once its copy is durable (writer.py). Kept free
of the archive's heavier imports: the ingress calls it for every message.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.config import ArchiveSettings
from relay.records import PlanEntry


def archive_entry(settings: ArchiveSettings, plan: Sequence[PlanEntry]) -> PlanEntry | None:
    """The plan's archive destination, or None when this message is not archived.

    One per message (the archive keeps the message, not a recipient's copy), with
    role `shadow`: a failing archive never bounces to the sender.
    """
    if not settings.enabled or not plan:
        return None
    pilot = any(p.pilot for p in plan)
    if settings.scope == "pilots" and not pilot:
        return None
    return PlanEntry("", "archive", "", "shadow", None, None, pilot)
