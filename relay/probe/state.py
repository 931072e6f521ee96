"""What the probe knows between looks, and keeps across restarts.

From the delivery log it learns each pilot message (its Message-ID from the
`received` event) and each copy delivered to a probed provider (a `Look`, due
after each of `placement.delays`). The state file holds the log position, the
messages still waiting for a delivery, the looks still open and the keys of
the looks finished lately, written atomically (tmp, fsync, rename, fsync dir):
so after a restart nothing delivered is forgotten (the log is re-read from the
saved position) and nothing finished is probed again (a crash duplicate of a
`delivered` event finds its key among the finished ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from relay.canary import CANARY_GROUP
from relay.config import RelaySettings
from relay.probe.config import PlacementSettings
from relay.probe.follow import Position
from relay.probe.imap import Wanted
from relay.routing import PilotTable, lookup, resolve_recipient, split_address

STATE_VERSION = 1
DONE_KEPT = 2 * 86400  # seconds a finished key is remembered beyond give_up_after


@dataclass
class Look:
    """One delivered copy to find, and where it is in its schedule of looks."""

    node: str
    queue_id: str
    rcpt: str
    provider: str
    delivered_to: str
    group: str | None
    message_id: str | None
    received: str | None
    delivered: float  # epoch of the provider's 250 (the `delivery` event's ts)
    auth_class: str | None = None
    step: int = 0  # index into ProbeState.schedule(look) of the next look
    error: str | None = None  # why the last look failed, if it did
    # a canary copy not delivered (yet): `delivered` is its received time, its one look the
    # deadline, when it is missing; its `delivery` event replaces it by a real look
    pending: bool = False

    @property
    def canary(self) -> bool:
        return self.group == CANARY_GROUP

    @property
    def key(self) -> str:
        return look_key(self.node, self.queue_id, self.rcpt, self.provider)

    @property
    def trace(self) -> str:
        return f"{self.node} {self.queue_id}"

    def due(self, looks: tuple[float, ...]) -> float:
        return self.delivered + looks[self.step]

    def wanted(self) -> Wanted:
        return Wanted(self.key, self.message_id, self.trace, self.since())

    def since(self) -> date:
        """The day to sweep from: the day before the 250, so no time zone can hide it."""
        return date.fromordinal(datetime.fromtimestamp(self.delivered, UTC).date().toordinal() - 1)


def look_key(node: str, queue_id: str, rcpt: str, provider: str) -> str:
    return f"{node} {queue_id} {rcpt.lower()} {provider}"


def sampled(node: str, queue_id: str, rcpt: str, fraction: float) -> bool:
    """A stable choice per pilot pair, the same for both providers (so pairs compare)."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"{node} {queue_id} {rcpt.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class MessageInfo:
    """A pilot message between its `received` event and its last probed delivery."""

    message_id: str | None
    received: str
    received_epoch: float
    auth_class: str | None
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)  # "rcpt provider" -> plan


def _epoch(ts: Any) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


class ProbeState:
    """Messages, open looks and finished keys; fed one delivery-log event at a time."""

    def __init__(
        self,
        settings: PlacementSettings,
        relay: RelaySettings,
        pilots: Callable[[], PilotTable],
        now: Callable[[], float],
    ):
        self.settings = settings
        self.relay = relay
        self.pilots = pilots
        self.now = now
        self.probed = set(settings.providers)
        self.looks_at = settings.looks()
        self.canary_looks_at = settings.looks(relay.canary.timeout)
        self.position = Position()
        self.messages: dict[str, MessageInfo] = {}
        self.looks: dict[str, Look] = {}
        self.done: dict[str, float] = {}
        self.skipped = 0  # delivered copies not probed: opted out, not sampled, too old

    def schedule(self, look: Look) -> tuple[float, ...]:
        """A canary's looks end at `canary.timeout`, a pilot copy's at `give_up_after`."""
        return self.canary_looks_at if look.canary else self.looks_at

    # -- the delivery log

    def ingest(self, ev: dict[str, Any]) -> list[Look]:
        """Apply one delivery-log event; the new Looks (a probed copy delivered, or the
        pending looks of a canary received)."""
        kind, node, qid = ev.get("event"), ev.get("node"), ev.get("queue_id")
        if not (isinstance(node, str) and isinstance(qid, str)):
            return []
        mkey = f"{node} {qid}"
        if kind == "received":
            return self._received(mkey, ev)
        info = self.messages.get(mkey)
        rcpt = ev.get("rcpt")
        if info is None or not isinstance(rcpt, str):
            return []
        if kind == "deleted":
            for p in [ev.get("provider")] if ev.get("provider") else self.probed:
                info.waiting.pop(f"{rcpt.lower()} {p}", None)
        elif kind == "delivery" and ev.get("outcome") in ("delivered", "bounced", "expired"):
            plan = info.waiting.pop(f"{rcpt.lower()} {ev.get('provider')}", None)
            if plan is not None and ev["outcome"] == "delivered":
                look = self._delivered(node, qid, rcpt, plan, info, _epoch(ev.get("ts")))
                self._forget_if_done(mkey, info)
                return [] if look is None else [look]
        self._forget_if_done(mkey, info)
        return []

    def _forget_if_done(self, mkey: str, info: MessageInfo) -> None:
        if not info.waiting:
            self.messages.pop(mkey, None)

    def _received(self, mkey: str, ev: dict[str, Any]) -> list[Look]:
        plan = ev.get("plan")
        if mkey in self.messages or not isinstance(plan, list):
            return []
        waiting = {
            f"{e['rcpt'].lower()} {e['provider']}": e
            for e in plan
            if isinstance(e, dict) and e.get("pilot") is True
            and e.get("provider") in self.probed and isinstance(e.get("rcpt"), str)
        }  # fmt: skip
        received_epoch = _epoch(ev.get("ts"))
        if not waiting or received_epoch is None:
            return []
        auth = ev.get("auth")
        auth_class = auth.get("class") if isinstance(auth, dict) else None
        mid = ev.get("message_id")
        info = self.messages[mkey] = MessageInfo(
            mid if isinstance(mid, str) else None, ev["ts"], received_epoch,
            auth_class if isinstance(auth_class, str) else None, waiting,
        )  # fmt: skip
        # a canary that never reaches a provider (down, deferred, bounced) is missing there too
        node, qid = mkey.split(" ", 1)
        pending = (
            self._delivered(node, qid, e["rcpt"], e, info, received_epoch, pending=True)
            for e in waiting.values()
            if e.get("group") == CANARY_GROUP
        )
        return [look for look in pending if look is not None]

    def _delivered(
        self,
        node: str,
        qid: str,
        rcpt: str,
        plan: dict[str, Any],
        info: MessageInfo,
        delivered: float | None,
        pending: bool = False,
    ) -> Look | None:
        key = look_key(node, qid, rcpt, str(plan["provider"]))
        known = self.looks.get(key)
        if delivered is None or (known is not None and not known.pending) or key in self.done:
            return None
        look = Look(
            node=node, queue_id=qid, rcpt=rcpt, provider=str(plan["provider"]),
            delivered_to=str(plan.get("delivered_to") or rcpt), group=plan.get("group"),
            message_id=info.message_id, received=info.received, delivered=delivered,
            auth_class=info.auth_class, pending=pending,
        )  # fmt: skip
        now = self.now()
        looks_at = self.schedule(look)
        if known is None and (  # a canary awaited since its `received` is looked for anyway
            delivered + looks_at[-1] < now
            # canaries are always probed: they prove the setup works
            or not (look.canary or sampled(node, qid, rcpt, self.settings.sample))
            or not self.may_probe(rcpt)
        ):
            self.skipped += not pending  # counted when (if) its delivery is read
            return None
        # looks already past (a probe that was down, or started late) collapse into one now
        elapsed = now - delivered
        passed = [i for i, t in enumerate(looks_at) if t <= elapsed]
        look.step = len(looks_at) - 1 if pending else passed[-1] if passed else 0
        self.looks[key] = look
        return look

    def may_probe(self, rcpt: str) -> bool:
        """Only while the current pilot list has the user, without `probe: false`."""
        resolved = resolve_recipient(rcpt, self.relay)
        if resolved is None:
            return False
        local, domain = split_address(resolved[0], self.relay.domains[0])
        entry = lookup(local, domain, self.pilots())
        return entry is not None and entry.probe

    # -- finishing looks

    def finish(self, look: Look) -> None:
        self.looks.pop(look.key, None)
        self.done[look.key] = self.now()

    def prune(self) -> None:
        """Forget finished keys and waiting messages too old to matter."""
        now = self.now()
        keep_done = self.settings.give_up_after + DONE_KEPT
        self.done = {k: t for k, t in self.done.items() if now - t < keep_done}
        keep_msg = self.relay.retry.max_age + 86400
        self.messages = {
            k: m for k, m in self.messages.items() if now - m.received_epoch < keep_msg
        }

    # -- persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "log": asdict(self.position),
            "messages": {k: asdict(m) for k, m in self.messages.items()},
            "looks": [asdict(lk) for lk in self.looks.values()],
            "done": self.done,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        self.position = Position(**data["log"])
        self.messages = {k: MessageInfo(**m) for k, m in data["messages"].items()}
        looks = (Look(**lk) for lk in data["looks"])
        self.looks = {lk.key: lk for lk in looks if lk.provider in self.probed}
        for lk in self.looks.values():  # delays may have changed since the state was saved
            lk.step = min(lk.step, len(self.schedule(lk)) - 1)
        self.done = {str(k): float(v) for k, v in data["done"].items()}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, path: Path) -> bool:
        """Read a saved state; False when there is none (first start)."""
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return False
        self.load_json(data)
        return True

    def remember_logged(self, placement_log: Path) -> None:
        """Without a saved state: the copies the placement log already has count as finished.

        The delivery log is then read from its start, and this keeps a lost state
        file from having every copy still in it probed a second time.
        """
        now = self.now()
        for path in (placement_log.with_name(placement_log.name + ".1"), placement_log):
            try:
                with open(path, "rb") as f:
                    for raw in f:
                        try:
                            ev = json.loads(raw)
                            key = look_key(ev["node"], ev["queue_id"], ev["rcpt"], ev["provider"])
                        except (ValueError, KeyError, TypeError, AttributeError):
                            continue
                        self.done[key] = now
            except OSError:
                continue
