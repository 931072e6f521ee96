"""`relay demo`: the whole product on loopback, with no configuration.

Two stand-in providers (relay.testing.Provider) on free loopback ports, a relay
in front of them, sample traffic for several groups — including a message the
new provider rejects as spam and one it defers once — then the comparison
report, written as deliveries.jsonl, report.json and report.html (charts).

Where Dovecot is installed each stand-in files every copy it accepts in a real
IMAP mail store (relay.dovecot, over LMTP), whose Sieve script plays that
provider's filter: legacy junks the spam-like sample the new provider refused,
and the new one junks the marketing newsletters legacy puts in the Inbox. The
placement probe runs with short delays and finds each copy, so the report has
a Placement section and the marketing group is "not ready" because of it
(placement.jsonl is written too). Everything runs in this process or is
stopped by its PID, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib

from relay import config, dovecot
from relay.app import Relay
from relay.log import setup_operational_log
from relay.probe.daemon import Probe
from relay.report.html import render_html
from relay.report.json import render_json
from relay.report.logs import build_report
from relay.report.model import Report
from relay.report.placement import attach_placement
from relay.report.text import render_text
from relay.testing import Provider, Rule

PILOTS = """\
new_domains:
  example.com: example-new.com
  dev.example.com: dev.example-new.com
pilots:
  - {address: alice@example.com, group: sales}
  - {address: sam@example.com, group: sales}
  - {address: bob@example.com, group: support, mode: new-only, new_address: robert@example-new.com}
  - {address: sue@example.com, group: support}
  - {address: sven@example.com, group: support}
  - {address: carol@example.com, group: marketing}
  - {address: mark@example.com, group: marketing}
  - {address: "*@dev.example.com", group: dev}
"""
RECIPIENTS = [
    "alice@example.com", "sam@example.com", "bob@example.com", "sue@example.com",
    "sven@example.com", "carol@example.com", "mark@example.com", "dina@dev.example.com",
    "ivan@dev.example.com", "zoe@example.com", "yann@example.com", "xavier@example.com",
]  # fmt: skip
SPAM_MARK = b"X-Demo-Spam: yes"
NEWSLETTER = "X-Demo-Newsletter: yes"  # marketing mail the new provider's filter junks
# The stand-ins' spam filters (Sieve, run by Dovecot as it files each copy).
SIEVE = {
    "legacy": 'if header :is "X-Demo-Spam" "yes" { fileinto "Junk"; stop; }',
    "new": 'if header :is "X-Demo-Newsletter" "yes" { fileinto "Junk"; stop; }',
}
PASSWORD_ENV = "RELAY_DEMO_IMAP_PASSWORD"


def _config(folder: Path, legacy: int, new: int, imap: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot-users.yaml").write_text(PILOTS)
    path = folder / "relay.yaml"
    probed = "".join(
        f"    {name}: {{host: 127.0.0.1, port: {port}, tls: none, password_env: {PASSWORD_ENV}}}\n"
        for name, port in imap.items()
    )
    placement = (
        "placement:\n  enabled: true\n  log: placement.jsonl\n  delays: [0.3, 1]\n"
        f"  give_up_after: 3\n  metrics_port: 0\n  providers:\n{probed}"
        if imap
        else ""
    )
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0, hostname: relay.demo.test}\n"
        "node: demo\ndomains: [example.com, dev.example.com]\n"
        f"providers:\n  legacy: {{port: {legacy}}}\n  new: {{port: {new}}}\n"
        "bounce: {port: %d}\nspool: spool\nlog: deliveries.jsonl\n"
        "retry: {schedule: [1], max_age: 600}\nshutdown_timeout: 5\n"
        "metrics: {port: 0}\nlimits: {min_free_space: 0}\n%s" % (legacy, placement)
    )
    return path


@contextlib.asynccontextmanager
async def _mail_stores(providers: dict[str, Provider]) -> AsyncIterator[dict[str, int]]:
    """Dovecot behind each stand-in when installed: {provider: IMAP port}, else {}."""
    if dovecot.available() is None:
        yield {}
        return
    stores = {name: dovecot.Dovecot(SIEVE[name], name=f"demo-{name}") for name in providers}
    try:
        for name, store in stores.items():
            store.start()
            store.attach(providers[name])
        os.environ[PASSWORD_ENV] = dovecot.PASSWORD
        yield {name: store.imap_port for name, store in stores.items()}
    finally:
        dovecot.Dovecot.close_all(list(stores.values()))


def _message(i: int, sender: str, rcpt: str, spam: bool) -> bytes:
    lines = [
        f"From: <{sender}>",
        f"To: <{rcpt}>",
        f"Subject: demo message {i}",
        f"Message-ID: <demo-{i}@sender.demo.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    if spam:
        lines.append(SPAM_MARK.decode())
    if rcpt in ("carol@example.com", "mark@example.com") and (i // len(RECIPIENTS)) % 3 == 0:
        lines.append(NEWSLETTER)
    body = [f"Hello {rcpt.split('@')[0]}, this is sample message {i}."] * 5
    return ("\r\n".join(lines) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode()


async def _send(port: int, messages: int, rng: random.Random) -> int:
    accepted = 0
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await smtp.connect()
    for i in range(messages):
        rcpt = RECIPIENTS[i % len(RECIPIENTS)]
        sender = f"news{rng.randrange(5)}@sender.demo.test"
        spam = i == 4  # to sven: the new provider refuses it, legacy takes it (and junks it)
        errors, _ = await smtp.sendmail(sender, [rcpt], _message(i, sender, rcpt, spam))
        accepted += not errors
    await smtp.quit()
    return accepted


async def _wait_drained(relay: Relay, deadline: float) -> None:
    while relay.scheduler.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _wait_placed(probe: Probe, deadline: float) -> None:
    """Until the probe has read every delivery and settled every copy it looks for."""
    while time.monotonic() < deadline:
        probe.ingest_available()
        if not probe.state.looks and not probe.state.messages:
            return
        await asyncio.sleep(0.05)


async def run_demo(messages: int, out: Path) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    legacy, new = Provider("legacy"), Provider("new")
    await legacy.start()
    await new.start()
    new.add(Rule("reject", stage="after_data", contains=SPAM_MARK, code=550,
                 text="5.7.1 Message rejected as spam by content filter"))  # fmt: skip
    new.add(Rule("defer", stage="rcpt", rcpt="sue@example-new.com", times=1, code=451,
                 text="4.7.1 Greylisted, try again later"))  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    relay = probe = None
    try:
        async with _mail_stores({"legacy": legacy, "new": new}) as imap:
            cfg = config.load(_config(work, legacy.port, new.port, imap))
            relay = Relay(cfg)
            await relay.start()
            if imap:
                probe = Probe(cfg)
                await probe.start()
            await _send(relay.port, messages, random.Random(7))
            await _wait_drained(relay, time.monotonic() + 20)
            if probe:
                await _wait_placed(probe, time.monotonic() + 10)
                await probe.stop()
    finally:
        if relay:
            await relay.stop()
        await legacy.stop()
        await new.stop()
    log = out / "deliveries.jsonl"
    shutil.copyfile(work / "deliveries.jsonl", log)
    placement = out / "placement.jsonl"
    if probe:
        shutil.copyfile(work / "placement.jsonl", placement)
    shutil.rmtree(work, ignore_errors=True)
    rep = build_report([str(log)])
    if probe:
        attach_placement(rep, [placement])
    (out / "report.json").write_text(render_json(rep))
    (out / "report.html").write_text(render_html(rep), encoding="utf-8")
    return rep


def main(messages: int, out: Path) -> str:
    setup_operational_log()  # the relay's own log lines go to stderr; stdout is the report
    rep = asyncio.run(run_demo(messages, out))
    return render_text(rep) + f"\nwrote {out / 'report.html'} (open it in a browser)"
