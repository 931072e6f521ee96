"""A real Postfix as both providers (slow): what it saw of the relay's DSN parameters
(its smtpd logs every command of a debug peer) and its answers to verification probes.

A private instance (as /work/shared anchors' pf_instance.sh, RECIPES.md "Postfix
as a provider"): its own config, queue and log under a temporary folder, smtpd on
a free loopback port, virtual mailboxes for the users it has. Stopped with
`postfix -c DIR stop`, which acts on that instance only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.testing import Provider
from tests import test_delivery
from tests.harness import RawClient, free_port
from tests.test_delivery import SENDER, Factory, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.realservers,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        POSTFIX is None or os.geteuid() != 0,
        reason="needs postfix installed (apt-get install postfix) and root to run an instance",
    ),
]
USERS = ("alice@example.com", "yann@example.com", "alice@example-new.com")


@dataclass
class Postfix:
    base: Path
    port: int

    @property
    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def commands(self) -> list[str]:
        """The SMTP commands its smtpd received (debug_peer_list logs them: `< peer: CMD`)."""
        return re.findall(r"smtpd\[\d+\]: < [^:]+: (.*)", self.log)

    def delivered(self) -> list[str]:
        """The mailboxes virtual(8) delivered to."""
        return re.findall(r"to=<([^>]+)>.*relay=virtual.*status=sent", self.log)


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    # not under pytest's 0700 tmp folder: Postfix's daemons run as `postfix` and must get in
    base = Path(tempfile.mkdtemp(prefix="relay-postfix-"))
    base.chmod(0o755)
    etc, spool, data, mail = base / "etc", base / "spool", base / "data", base / "mail"
    for d in (etc, spool, data, mail):
        d.mkdir()
    shutil.chown(data, "postfix", "postfix")
    shutil.chown(mail, 65534, 65534)
    (etc / "mailboxes").write_text("".join(f"{u} {u}/\n" for u in USERS))
    port = free_port()
    (etc / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.com, example-new.com
virtual_mailbox_maps = texthash:{etc}/mailboxes
virtual_mailbox_base = {mail}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_mailbox_limit = 0
recipient_delimiter = +
smtputf8_enable = yes
local_header_rewrite_clients =
smtp_dns_support_level = disabled
smtpd_tls_security_level = none
debug_peer_list = 127.0.0.1
debug_peer_level = 1
biff = no
maillog_file_prefixes = /tmp, /var
maillog_file = {base}/maillog
"""
    )
    (etc / "master.cf").write_text(
        f"""127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    )
    assert POSTFIX is not None
    _run(POSTFIX, "-c", str(etc), "start")
    try:
        deadline = time.monotonic() + 20
        while "daemon started" not in Postfix(base, port).log:
            assert time.monotonic() < deadline, "postfix did not start"
            time.sleep(0.1)
        yield Postfix(base, port)
    finally:
        with contextlib.suppress(Exception):
            _run(POSTFIX, "-c", str(etc), "stop")
        shutil.rmtree(base, ignore_errors=True)


def at(postfix: Postfix) -> dict[str, object]:
    """Provider settings pointing at the Postfix instance."""
    return {"host": "127.0.0.1", "port": postfix.port}


async def test_shadow_copy_reaches_postfix_with_notify_never(
    make_env: Factory, postfix: Postfix
) -> None:
    """Postfix offers DSN: the primary copy goes as the client sent it (no NOTIFY),
    the shadow copy with NOTIFY=NEVER, as Postfix's own log shows."""
    unused = Provider("unused")  # make_env's providers: replaced by Postfix in the settings
    env = await make_env(
        legacy=unused, new=Provider("unused-new"), legacy_cfg=at(postfix), new_cfg=at(postfix)
    )
    await env.send(["alice@example.com"])
    await env.wait_events(2, outcome="delivered", timeout=30)
    rcpts = [c for c in postfix.commands() if c.upper().startswith("RCPT TO:")]
    assert "RCPT TO:<alice@example-new.com> NOTIFY=NEVER" in rcpts, rcpts
    assert "RCPT TO:<alice@example.com>" in rcpts, rcpts
    await until(lambda: {"alice@example.com", "alice@example-new.com"} <= set(postfix.delivered()),
                30, "both copies in their mailboxes")  # fmt: skip


async def test_verify_recipients_answers_from_postfix(make_env: Factory, postfix: Postfix) -> None:
    env = await make_env(
        legacy=Provider("unused"), new=Provider("unused-new"), legacy_cfg=at(postfix),
        new_cfg=at(postfix), extra={"verify_recipients": True, "verify_timeout": 10},
    )  # fmt: skip
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    unknown = await c.cmd("RCPT TO:<nobody@example.com>")
    assert (unknown.code, unknown.enhanced) == (550, "5.1.1"), unknown
    known = await c.cmd("RCPT TO:<yann@example.com>")
    assert known.code == 250, known
    again = await c.cmd("RCPT TO:<nobody@example.com>")
    assert again.code == 550
    await c.close()
    probes = [c for c in postfix.commands() if c.startswith("RCPT TO:<nobody@example.com>")]
    assert len(probes) == 1  # the repeat came from the cache
    assert "MAIL FROM:<>" in postfix.commands()
    assert re.search(r"reject: RCPT from [^:]+: 550 5\.1\.1 <nobody@example\.com>", postfix.log)
