"""The delivery agent: transactions over a cache of open provider connections.

It classifies and reports; it decides nothing about retries (that is the
scheduler's job).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

import aiosmtplib

from relay.config import DnsSettings, ProviderSettings
from relay.delivery.connect import Session, hang_up, open_session
from relay.delivery.content import Content
from relay.delivery.hosts import Hosts
from relay.delivery.reply import Attempt, Failed, Reply, fill
from relay.delivery.transaction import Outcome, probe, transaction
from relay.resolver import Resolver

_Key = tuple[tuple[str, tuple[str, ...], int], str, str | None, str]


class Agent:
    """The delivery agent: one transaction per call, over cached connections.

    After a transaction the connection waits (at most `idle` seconds) for the
    next transaction to the same provider, like Postfix's connection cache
    (smtp_connection_cache_time_limit 2 s, smtp_connection_reuse_time_limit
    300 s; like Postfix, no limit on the number of transactions unless
    `max_uses` sets one; 0 disables the cache). The scheduler runs at most
    `max_connections` attempts per provider at a time before their final "."
    (below), and a connection is opened only when none is cached or handed
    over, so that is also the most connections a provider sees. A cached
    connection that turns out to be broken before the final "." of DATA (a
    reset, an EOF, a 421) is replaced at once by a new one and the transaction
    sent again: the provider cannot have the message.

    A new connection goes to the provider's hosts in turn (`Hosts`) until one
    takes the transaction.

    On a provider that offers PIPELINING a session is handed over as soon as a
    transaction's final "." is written (`send`'s `written` is called then): the
    next transaction writes its MAIL, RCPT and DATA behind it and reads their
    replies after that final reply, so a connection carries a message a round
    trip instead of two. The scheduler's slot is free from that moment, and a
    connection is still opened only when no session is cached or handed over:
    the most connections a provider sees stays `max_connections`.
    """

    def __init__(
        self,
        idle: float = 2.0,
        max_uses: int | None = None,
        max_age: float = 300.0,
        hosts: Hosts | None = None,
    ):
        self.idle = idle
        self.max_uses = max_uses
        self.max_age = max_age
        self.hosts = hosts or Hosts(Resolver(DnsSettings()))
        self._cache: dict[_Key, list[Session]] = {}
        # sessions whose transaction has written its "." and waits for the reply:
        # the next transaction may write behind it (taken after the idle ones)
        self._handed: dict[_Key, list[Session]] = {}
        self._keys: dict[tuple[int, str], tuple[ProviderSettings, _Key]] = {}

    async def send(
        self,
        cfg: ProviderSettings,
        mail_from: str,
        rcpts: list[str],
        content: Content | bytes,
        options: list[str],
        helo: str,
        rcpt_options: Mapping[str, list[str]] | None = None,
        *,
        written: Callable[[], None] | None = None,
    ) -> Attempt:
        """One transaction carrying `rcpts`; a reply for every one of them.

        Never raises for anything the provider or the network does: every
        failure becomes a `Reply` (code None when no reply came). Duplicate
        recipients are sent once and share the reply. `rcpt_options`: each
        recipient's DSN parameters (NOTIFY, ORCPT), for a provider that offers DSN.
        `written`: called when the session is handed over to the next transaction
        (the final "." written, its reply still to come); maybe never.
        """
        if isinstance(content, bytes):
            content = Content.from_bytes(content)
        body = content
        rcpts = list(dict.fromkeys(rcpts))

        def exchange(
            session: Session, attempt: Attempt, handover: Callable[[], bool]
        ) -> Awaitable[Outcome]:
            return transaction(
                session, mail_from, rcpts, body, options, attempt, rcpt_options, handover
            )

        return await self._run(cfg, helo, rcpts, exchange, written)

    async def probe(self, cfg: ProviderSettings, rcpt: str, helo: str) -> Reply:
        """Whether the provider takes mail for `rcpt`: `MAIL FROM:<>`, `RCPT TO`, `RSET`
        (Postfix's verify(8) probe), over the same cached connections as `send`."""
        attempt = await self._run(
            cfg, helo, [rcpt], lambda session, attempt, _: probe(session, rcpt, attempt)
        )
        return attempt.replies[rcpt]

    async def _run(
        self,
        cfg: ProviderSettings,
        helo: str,
        rcpts: list[str],
        exchange: Callable[[Session, Attempt, Callable[[], bool]], Awaitable[Outcome]],
        written: Callable[[], None] | None = None,
    ) -> Attempt:
        """`exchange` on a cached session, else on a new one to each host in turn."""
        known = self._keys.get((id(cfg), helo))
        if known is not None and known[0] is cfg:
            key = known[1]
        else:  # `destination` builds its tuples anew at each use
            key = (cfg.destination, cfg.tls, cfg.username, helo)
            self._keys[(id(cfg), helo)] = (cfg, key)
        session = self._take(key)
        if session is not None:
            attempt = Attempt({}, tls=session.tls)
            outcome = await self._exchange(key, session, attempt, exchange, written)
            if outcome != "stale":
                return attempt
            session.smtp.close()  # broke before the final ".": once more, at once
        try:
            hosts, skipped = await self.hosts.route(cfg)
        except Failed as failed:
            return Attempt(dict.fromkeys(rcpts, failed.reply))
        refusals: list[Reply] = []
        for n, host in enumerate(hosts, 1):
            attempt = Attempt({})
            try:
                session = await open_session(cfg, host, helo)
            except Failed as failed:
                reply = failed.reply
                if reply.stage == "connect" and reply.code is None:
                    self.hosts.failed(cfg, host)
                refusals.append(reply)
                if n < len(hosts) and _next_host(cfg, reply):
                    continue
                fill(attempt.replies, rcpts, _every_host_failed(refusals, skipped))
                return attempt
            self.hosts.connected(cfg, host)
            attempt.tls = session.tls
            outcome = await self._exchange(key, session, attempt, exchange, written)
            if outcome != "stale" or n == len(hosts):
                return attempt
            # 421 before the final ".": this host is closing, the next may take it
        raise AssertionError("unreachable: the last host always returns")

    async def _exchange(
        self,
        key: _Key,
        session: Session,
        attempt: Attempt,
        exchange: Callable[[Session, Attempt, Callable[[], bool]], Awaitable[Outcome]],
        written: Callable[[], None] | None,
    ) -> Outcome:
        """One transaction on `session`; the session released after it, unless it
        was handed over and taken by the next (which releases it in turn)."""
        handed = False

        def handover() -> bool:
            nonlocal handed
            if not self._usable(session, session.uses + 1):
                return False
            session.uses += 1
            handed = True
            self._handed.setdefault(key, []).append(session)
            if written is not None:
                written()
            return True

        outcome = await exchange(session, attempt, handover)
        if not handed:
            session.uses += 1
            self._release(key, session, outcome == "reusable")
        elif session in (waiting := self._handed.get(key, [])):  # nobody took it
            waiting.remove(session)
            self._release(key, session, outcome == "reusable")
        return outcome

    def _take(self, key: _Key) -> Session | None:
        """An idle session, else one handed over (its transaction closes it if broken)."""
        idle = self._cache.get(key)
        while idle:
            session = idle.pop()  # the most recently used: the warmest
            if session.idle is not None:
                session.idle.cancel()
            if session.smtp.is_connected:
                return session
            session.smtp.close()
        handed = self._handed.get(key)
        while handed:
            session = handed.pop(0)  # the first handed over: its reply comes first
            if session.smtp.is_connected:
                return session
        return None

    def _usable(self, session: Session, uses: int) -> bool:
        """Whether a session that has carried `uses` transactions may carry another."""
        return (
            session.smtp.is_connected
            and self.max_uses != 0
            and (self.max_uses is None or uses < self.max_uses)
            and asyncio.get_running_loop().time() - session.opened < self.max_age
        )

    def _release(self, key: _Key, session: Session, reusable: bool) -> None:
        loop = asyncio.get_running_loop()
        if not reusable or not self._usable(session, session.uses):
            if session.smtp.is_connected:
                # QUIT after returning: the caller records the outcome a round trip
                # sooner, which narrows the window in which a crash makes a duplicate.
                _quit_later(session.smtp, session.cfg)
            else:
                session.smtp.close()
            return
        session.idle = loop.call_later(self.idle, self._expire, key, session)
        self._cache.setdefault(key, []).append(session)

    def _expire(self, key: _Key, session: Session) -> None:
        idle = self._cache.get(key, [])
        if session in idle:
            idle.remove(session)
            _quit_later(session.smtp, session.cfg)

    async def close(self) -> None:
        """Close every cached connection (QUIT written, not waited for)."""
        cache, self._cache = self._cache, {}
        for sessions in [*cache.values(), *self._handed.values()]:
            for session in sessions:
                if session.idle is not None:
                    session.idle.cancel()
                hang_up(session.smtp)


def _next_host(cfg: ProviderSettings, reply: Reply) -> bool:
    """Whether a failure to open a session sends the attempt on to the next host:
    a refused or timed-out connection, a 4xx/5xx greeting (or EHLO), a 421, a
    TLS failure under `tls: required|implicit`. Never an AUTH failure: every
    host checks the same account, and each try could count towards a lockout."""
    if reply.stage == "connect" or reply.code == 421:
        return True
    return reply.stage == "tls" and cfg.tls in ("required", "implicit")


def _every_host_failed(refusals: list[Reply], skipped: int) -> Reply:
    """The reply an attempt ends with when no host took it: the last one, final
    only when every host answered 5xx at the greeting (none skipped as dead),
    else the last transient one, so the attempt is retried."""
    last = refusals[-1]
    if not last.permanent or (skipped == 0 and all(r.permanent for r in refusals)):
        return last
    transient = [r for r in refusals if not r.permanent]
    if transient:
        return transient[-1]
    return Reply(None, f"{last.code} {last.text} ({skipped} dead host(s) not tried)", last.stage)


_quitting: set[asyncio.Task[None]] = set()


def _quit_later(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    """QUIT in the background (the task closes `smtp` in the end)."""
    task = asyncio.create_task(_quit(smtp, cfg))
    _quitting.add(task)
    task.add_done_callback(_quitting.discard)


async def _quit(smtp: aiosmtplib.SMTP, cfg: ProviderSettings) -> None:
    """QUIT politely; the outcome is already known, so any failure here is ignored."""
    try:
        with contextlib.suppress(Exception):
            await smtp.quit(timeout=min(5.0, cfg.command_timeout))
    finally:
        smtp.close()
