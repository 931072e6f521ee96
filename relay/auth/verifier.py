"""The verdict of one message at the end of DATA, within `auth.timeout`.

SPF, DKIM and ARC validation run at once, each synchronous library in a
worker thread of our own (never the default pool the spool's writes use), with
every lookup on the event loop through relay/resolver.py; DMARC follows on the
loop. A check that has not finished by the deadline is `temperror`, and so is
any fault: a verdict never delays the `250` past `auth.timeout`, never refuses
and never changes a route.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from relay.auth import arc, dkim, dmarc, results, spf
from relay.auth.lookups import Lookups
from relay.auth.verdict import classify
from relay.config import RelaySettings
from relay.log import oplog
from relay.records import AuthVerdict, Provider
from relay.resolver import DnsFailure, Resolver

_T = TypeVar("_T")
PROVIDERS: tuple[Provider, ...] = ("legacy", "new")
THREADS = 4  # checks in flight at once; more wait (a check waits on DNS, rarely on CPU)


@dataclass(frozen=True)
class Judgement:
    verdict: AuthVerdict
    prepend: tuple[tuple[Provider, str], ...]  # header fields for each provider's copy


@dataclass(frozen=True)
class Message:
    """What the verifier is given: the client's message, and who sent it."""

    content: bytes  # the whole message, or its header section only when `whole` is false
    whole: bool  # false: over auth.max_dkim_size, so DKIM, ARC and the seal are skipped
    client_ip: str
    mail_from: str  # "" for the null sender
    helo: str

    @property
    def header(self) -> bytes:
        return self.content.split(b"\r\n\r\n", 1)[0] + b"\r\n"


class Verifier:
    def __init__(self, settings: RelaySettings, resolver: Resolver):
        a = settings.auth
        self.resolver = resolver
        self.authserv = a.authserv_id or settings.listen.hostname
        self.timeout = a.timeout
        self.add_header = a.add_authentication_results
        self.max_dkim_size = a.max_dkim_size
        self.arc = a.arc
        self.seal_key = arc.load_key(a.arc.key_file) if a.arc.seal and a.arc.key_file else None
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="auth")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def judge(self, msg: Message) -> Judgement:
        """The verdict and the header fields to add; never raises."""
        try:
            verdict = await self._verdict(msg)
        except Exception as exc:  # a library's bug must not cost the message its 250
            oplog.error("authentication check failed", error=repr(exc), exc_info=exc)
            verdict = AuthVerdict("temperror", None, (), "temperror", None, "none", None,
                                  "temperror")  # fmt: skip
        return Judgement(verdict, await self._prepend(msg, verdict))

    async def _verdict(self, msg: Message) -> AuthVerdict:
        loop = asyncio.get_running_loop()
        lookups = Lookups(self.resolver, loop, time.monotonic() + self.timeout)
        header = msg.header
        from_domain = dmarc.from_domain(header)
        spf_domain = spf.identity(msg.mail_from, msg.helo) or None
        policy = asyncio.ensure_future(dmarc.policy(lookups, from_domain))
        spf_job = self._thread(lookups, spf.check, lookups.probe(), msg.client_ip,
                               msg.mail_from, msg.helo)  # fmt: skip
        unhashed = [(d, "temperror") for d in dkim.signature_domains(header)]
        if msg.whole:
            dkim_job = self._thread(lookups, dkim.verify, lookups, msg.content)
            arc_job = self._thread(lookups, arc.validate, lookups, msg.content)
            dkim_results = await self._within(lookups, dkim_job, unhashed)
            arc_result = await self._within(lookups, arc_job, "fail")
        else:  # too big to hash (auth.max_dkim_size)
            dkim_results, arc_result = unhashed, "none"
        spf_result = await self._within(lookups, spf_job, "temperror")
        late = DnsFailure("auth.timeout passed before the DMARC record came")
        record = await self._within(lookups, policy, late)
        dmarc_result, applied = dmarc.evaluate(
            record, from_domain, spf_result, spf_domain, dkim_results
        )
        return AuthVerdict(
            spf_result, spf_domain, tuple(dkim_results), dmarc_result, applied, arc_result,
            from_domain, classify(spf_result, dkim_results, dmarc_result),
        )  # fmt: skip

    def _thread(self, lookups: Lookups, fn: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        return asyncio.wrap_future(self._pool.submit(fn, *args), loop=lookups.loop)

    @staticmethod
    async def _within(lookups: Lookups, job: asyncio.Future[_T], late: _T) -> _T:
        """The job's result, or `late` when the deadline passes first (the thread
        then ends soon: its lookups fail once the deadline is past)."""
        try:
            return await asyncio.wait_for(asyncio.shield(job), max(lookups.remaining(), 0))
        except TimeoutError:
            job.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, not logged
            return late

    async def _prepend(self, msg: Message, v: AuthVerdict) -> tuple[tuple[Provider, str], ...]:
        if not self.add_header:
            return ()
        field = results.header(self.authserv, v, helo_identity=not msg.mail_from)
        sealed = b""
        if self.seal_key is not None and msg.whole:
            try:
                sealed = await asyncio.wrap_future(self._pool.submit(
                    arc.seal, field + msg.content, self.arc.selector or "", self.arc.domain or "",
                    self.seal_key, self.authserv,
                ))  # fmt: skip
            except Exception as exc:
                oplog.error("ARC sealing failed; copies go unsealed", error=repr(exc))
        return tuple(
            (p, (sealed + field if p in self.arc.providers else field).decode("ascii"))
            for p in PROVIDERS
        )
