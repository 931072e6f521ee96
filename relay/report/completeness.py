"""The completeness line per group: does new hold what legacy delivered, live or replayed?

"new holds 1,234 of 1,234 messages legacy delivered since T: 1,230 live, 4 replayed".
The unit is the report's (message, recipient) pilot pair. Replays (`replayed`
events and the deliveries of role `replay`, SPEC Part 2 "Safety net") count
here only: they are kept out of every other figure (latency, rejection and
spam classes, the verdict), which the builder gets by handing them to this
module and nowhere else. Only pairs new is missing are remembered, plus the
replays, so memory stays proportional to the gaps, not to the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Pair = tuple[str, str, str]  # (node, queue id, recipient lowercased)


@dataclass
class GroupCompleteness:
    group: str
    legacy_delivered: int  # pilot pairs legacy delivered (or forwarded: legacy holds them)
    new_holds: int  # of those, delivered to new: live + replayed
    live: int
    replayed: int


class Completeness:
    """Fed by the report builder (relay/report/logs.py); `result()` at the end of input."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # group -> [legacy delivered, new live]
        self.missing: dict[Pair, str] = {}  # legacy has it, new not (live): -> group
        self.replays: dict[tuple[str, str], Pair] = {}  # replay (node, queue id) -> original
        self.delivered: set[tuple[str, str]] = set()  # replays new accepted

    def event(self, ev: dict[str, Any]) -> bool:
        """A replay's event (`replayed`, or a delivery of role `replay`); False if invalid."""
        key = (ev["node"], ev["queue_id"])
        if ev["event"] == "replayed":
            node, qid, rcpt = ev.get("original_node"), ev.get("original_queue_id"), ev.get("rcpt")
            if not (type(node) is str and type(qid) is str and type(rcpt) is str):
                return False
            if ev.get("provider") == "new":
                self.replays[key] = (node, qid, rcpt.lower())
        elif ev.get("provider") == "new" and ev.get("outcome") == "delivered":
            self.delivered.add(key)
        return True

    def pair(self, group: str, original: Pair, legacy_has: bool, new_live: bool) -> None:
        """One pilot pair of the report's window, once its outcome is known."""
        if not legacy_has:
            return
        counts = self.counts.setdefault(group, [0, 0])
        counts[0] += 1
        if new_live:
            counts[1] += 1
        else:
            self.missing[original] = group

    def result(self) -> list[GroupCompleteness]:
        replayed: dict[str, int] = {}
        filled = {orig for key, orig in self.replays.items() if key in self.delivered}
        for original in filled & self.missing.keys():
            group = self.missing[original]
            replayed[group] = replayed.get(group, 0) + 1
        out = []
        for group, (legacy, live) in sorted(self.counts.items()):
            again = replayed.get(group, 0)
            out.append(GroupCompleteness(group, legacy, live + again, live, again))
        return out


def completeness_sentences(groups: list[GroupCompleteness], since: str | None) -> list[str]:
    """One sentence per group, for the text report."""
    return [
        f"{g.group}: new holds {g.new_holds:,} of {g.legacy_delivered:,} messages legacy "
        f"delivered since {since or '-'}: {g.live:,} live, {g.replayed:,} replayed"
        for g in groups
    ]
