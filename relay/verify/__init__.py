"""Recipient verification at RCPT (SPEC Part 2 "Recipient verification"): refuse an
unknown user instead of accepting mail that would later bounce to a forged sender.

`listed` answers from `recipients: FILE`; `Verifier` (`verify_recipients: true`)
asks the recipient's primary provider, as Postfix's reject_unverified_recipient
does, and keeps the answers (`cache`). `RecipientCheck` is what the ingress asks.
Neither looks at postmaster (RFC 5321 §4.5.1: always accepted) nor at forwarded
copies (the legacy provider, which forwards them, already took the original).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from relay.config import ProviderSettings, RelaySettings
from relay.delivery import Agent, Reply
from relay.routing import PilotTable, resolve_recipient, route
from relay.scheduler import Scheduler
from relay.verify.cache import Answer, Key, VerifyCache
from relay.verify.listed import RecipientList

__all__ = ["RecipientCheck", "RecipientList", "Verifier"]

# what RCPT gets (the ingress's Reply.UNKNOWN_USER / VERIFY_PENDING), and why (for the log)
Refusal = tuple[Literal["unknown", "pending"], str]


class Verifier:
    """Probes a provider for an address, caches the answer, and says what RCPT gets.

    One probe at a time per address (a second RCPT waits for the first's answer);
    at most `max_connections` probes at once per provider, on connections of the
    verifier's own (deliveries never wait for a probe), to the hosts the
    scheduler's agent knows (dead hosts, the `dns:` resolver). A probe that
    outlasts `verify_timeout` goes on, and its answer is kept for the client's
    retry. A probe logs in like a delivery, so it keeps to the provider's AUTH
    hold: none while the account is held, and one that fails a login starts it.
    """

    def __init__(self, settings: RelaySettings, cache: VerifyCache, scheduler: Scheduler):
        self.timeout = settings.verify_timeout
        self.helo = settings.listen.hostname
        self.cache = cache
        self.scheduler = scheduler
        self.clock = scheduler.clock.now
        self.provider: Callable[[str], ProviderSettings] = scheduler.provider_settings
        self.agent = Agent(hosts=scheduler.agent.hosts)
        self.probes = 0  # probes sent, for tests and metrics
        self._running: dict[Key, asyncio.Task[Answer | None]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def refusal(self, provider: str, address: str) -> Refusal | None:
        key = (provider, address.lower())
        answer = self.cache.get(key, self.clock())
        if answer is not None:
            if answer.stale(self.clock()):
                self._probe(key, address)  # in the background; the cached answer stands
            return _reply_for(answer)
        task = self._probe(key, address)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await asyncio.shield(task)
        except TimeoutError:
            return "pending", "verification pending: no answer in time"
        if answer is None:
            return "pending", "verification pending: no answer"
        return _reply_for(answer)

    def _probe(self, key: Key, address: str) -> asyncio.Task[Answer | None]:
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key, address), name=f"verify-{address}")
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        return task

    async def _ask(self, key: Key, address: str) -> Answer | None:
        """The provider's answer, cached; None for a transient one (not cached)."""
        provider = key[0]
        slot = self._slots.setdefault(
            provider, asyncio.Semaphore(self.provider(provider).max_connections)
        )
        hold = self.scheduler.auth_hold(provider)
        if hold.pause(self.clock()) is not None:
            return None  # a login failed lately (or is being tried): no more logins now
        hold.taken()
        replies: list[Reply] = []
        try:
            async with slot:
                self.probes += 1
                reply = await self.agent.probe(self.provider(provider), address, self.helo)
                replies.append(reply)
        finally:
            if hold.settle(replies, self.clock()):
                self.scheduler.wake()
        if not (reply.ok or (reply.permanent and reply.stage == "rcpt")):
            return None  # 4xx, no answer, MAIL FROM:<> refused, a login fault: ask again
        answer = Answer(reply.ok, _text(reply), self.clock())
        self.cache.put(key, answer)
        return answer

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(BaseException):
                await task
        await self.agent.close()
        self.cache.close()


def _reply_for(answer: Answer) -> Refusal | None:
    return None if answer.ok else ("unknown", "unknown user (verified)")


def _text(reply: Reply) -> str:
    return f"{reply.code} {reply.text}" if reply.code is not None else reply.text


class RecipientCheck:
    """The ingress's question at RCPT: is this an address the relay should refuse?"""

    def __init__(
        self,
        settings: RelaySettings,
        listed: RecipientList | None,
        verifier: Verifier | None,
        pilots: Callable[[], PilotTable],
        clock: Callable[[], float],
    ):
        self.settings = settings
        self.listed = listed
        self.verifier = verifier
        self.pilots = pilots
        self.clock = clock

    async def refusal(self, address: str) -> Refusal | None:
        resolved = resolve_recipient(address, self.settings)
        if resolved is None or resolved[1]:
            return None  # refused elsewhere, a forwarded copy, or postmaster
        target = resolved[0]
        if target.partition("@")[0].lower() == "postmaster":
            return None
        if self.listed is not None and not self.listed.known(target):
            return "unknown", "unknown user"
        if self.verifier is None:
            return None
        now = datetime.fromtimestamp(self.clock(), UTC)
        primary = [d for d in route(target, self.pilots(), now, False).deliveries
                   if d.role == "primary"]  # fmt: skip
        if not primary:
            return None
        return await self.verifier.refusal(primary[0].provider, primary[0].delivered_to)
