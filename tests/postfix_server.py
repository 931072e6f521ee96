"""A private real Postfix on loopback, built per test module (RECIPES.md "Postfix as
a provider"), and the Dovecot that answers its SASL AUTH.

Each instance has its own config, queue, data dir and log under a temporary
folder (not under pytest's 0700 tmp folder: Postfix's daemons run as `postfix`
and must get in); `postfix -c DIR start|stop|reload` acts on that instance
only. It plays either side of the relay:

* a provider (`mailboxes=...`): virtual(8) mailboxes for the users it has,
  `check_recipient_access` rules (450/550) a test edits and reloads, STARTTLS
  (and implicit TLS on `tls_port`) with a certificate from a test CA, SASL AUTH
  through a private Dovecot, SMTPUTF8;
* the internet's MTA (`relayhost=...`): everything not for its own mailboxes
  goes to the relay, and its log says `status=sent|deferred|bounced`.

Every SMTP command its smtpd receives is logged (`debug_peer_list`), so a test
reads what the relay sent as Postfix saw it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.harness import free_port

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin")
START_TIMEOUT = 20.0
SASL_USER = "relayuser"
SASL_PASSWORD = "s3cret-Relay-pw"  # what the Dovecot passdb holds

MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
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


def run(*args: str, stdin: bytes = b"") -> str:
    """Run a command to its end; its output (through a file: a daemon it starts
    inherits stdout and stderr, and a pipe would stay open as long as that daemon)."""
    with tempfile.TemporaryFile() as out:
        r = subprocess.run(args, input=stdin, stdout=out, stderr=out, timeout=60)
        out.seek(0)
        text = out.read().decode(errors="replace")
    assert r.returncode == 0, f"{args}: {text}"
    return text


def _greets(port: int) -> bool:
    """Whether an smtpd on `port` answers a connection with its 220 greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            return s.recv(512).startswith(b"220 ")
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll `predicate` (called from a thread when a relay in the test's loop must
    go on meanwhile) until it holds, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Postfix:
    """One running instance: where it lives, its smtpd port, what it logged."""

    base: Path
    port: int
    tls_port: int = 0  # implicit TLS (smtpd_tls_wrappermode), when built with a CA
    ca_file: Path | None = None  # the test CA that signed its certificate
    sasl: Dovecot | None = None

    @property
    def etc(self) -> Path:
        return self.base / "etc"

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

    def statuses(self, rcpt: str) -> list[str]:
        """Its delivery agents' verdicts for `rcpt` in order: sent, deferred, bounced."""
        pattern = rf"to=<{re.escape(rcpt)}>,.* status=(\w+)"
        return re.findall(pattern, self.log, flags=re.IGNORECASE)

    def mailbox(self, user: str) -> list[bytes]:
        """The messages in `user`'s maildir (new/ and cur/)."""
        root = self.base / "mail" / user
        return [p.read_bytes() for d in ("new", "cur") for p in sorted((root / d).glob("*"))]

    # -- life cycle ------------------------------------------------------------

    def postfix(self, *args: str) -> str:
        assert POSTFIX is not None
        return run(POSTFIX, "-c", str(self.etc), *args)

    def master_pid(self) -> int | None:
        try:
            return int((self.base / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        """Start it and wait until its smtpd answers (and its SASL server, if any)."""
        self.postfix("start")
        if self.sasl:
            self.sasl.start()
        _wait(lambda: _greets(self.port), f"postfix on port {self.port}")

    def stop(self) -> None:
        """`postfix stop`, then wait until its master is gone and its port refuses."""
        pid = self.master_pid()
        self.postfix("stop")
        if self.sasl:
            self.sasl.stop()

        def gone() -> bool:
            if pid is not None:
                try:
                    os.kill(pid, 0)
                    return False
                except ProcessLookupError:
                    pass
            return not _greets(self.port)

        _wait(gone, "postfix to stop")

    def reload(self) -> None:
        """`postfix reload`, and wait until the daemons started before it are gone:
        an idle old smtpd could otherwise still take the next connection and
        answer with the old tables."""
        old = self.children("smtpd")
        self.postfix("reload")
        _wait(lambda: not old & self.children("smtpd"), "the old smtpd processes to exit")
        # the first smtpd after a reload of an instance with SASL takes 1.5 s to greet:
        # have one ready, so a client's connect timeout does not measure that
        assert _greets(self.port), "no greeting after reload"

    def children(self, name: str) -> set[int]:
        """PIDs of the master's child processes running daemon `name`."""
        master = str(self.master_pid())
        out = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                comm, rest = stat.read_text().rsplit(")", 1)
                if comm.endswith(f"({name}") and rest.split()[1] == master:
                    out.add(int(stat.parent.name))
        return out

    def sendmail(self, sender: str, rcpts: list[str], data: bytes) -> None:
        """Submit locally, as a program on its host would (sendmail(1), postdrop, pickup)."""
        run("/usr/sbin/sendmail", "-C", str(self.etc), "-f", sender, "--", *rcpts, stdin=data)

    def flush(self) -> None:
        """`postqueue -f`: try every deferred message now."""
        run("/usr/sbin/postqueue", "-c", str(self.etc), "-f")

    def access(self, rules: Mapping[str, str]) -> None:
        """Replace the `check_recipient_access` rules (address → reply) and reload."""
        (self.etc / "access").write_text("".join(f"{a} {r}\n" for a, r in rules.items()))
        self.reload()


class Dovecot:
    """Dovecot as Postfix's SASL server only (`protocols =`): a passwd-file passdb
    and the auth socket inside Postfix's queue (`private/auth`), failures answered
    at once (no penalty or delay to wait out in a test)."""

    def __init__(self, base: Path, spool: Path) -> None:
        assert DOVECOT is not None
        self.dir = base / "dovecot"
        self.dir.mkdir()
        (self.dir / "passwd").write_text(f"{SASL_USER}:{{PLAIN}}{SASL_PASSWORD}::::::\n")
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(
            f"""base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
instance_name = relay-sasl-{base.name}
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.dir}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {spool}/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        )
        self.socket = spool / "private" / "auth"

    def start(self) -> None:
        assert DOVECOT is not None
        run(DOVECOT, "-c", str(self.conf))
        _wait(self.socket.exists, "dovecot's auth socket")

    def stop(self) -> None:
        try:
            pid = int((self.dir / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True

        _wait(gone, "dovecot to stop")


@dataclass
class Build:
    """What an instance is: its names, mailboxes and what it offers."""

    name: str
    mailboxes: Iterable[str] = ()  # the users virtual(8) delivers to
    relayhost: str | None = None  # e.g. "[127.0.0.1]:2525": everything else goes there
    tls: bool = False  # STARTTLS (may) and implicit TLS, a certificate from a test CA
    sasl: bool = False  # AUTH PLAIN/LOGIN through a private Dovecot
    header_checks: str = ""  # regexp table: its content filter, after DATA
    main: dict[str, str] = field(default_factory=dict)  # more main.cf settings


def _main_cf(b: Build, base: Path, domains: list[str]) -> str:
    etc, spool = base / "etc", base / "spool"
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(spool),
        "data_directory": str(base / "data"),
        "command_directory": "/usr/sbin",
        "daemon_directory": "/usr/lib/postfix/sbin",
        "meta_directory": "/etc/postfix",
        "shlib_directory": "/usr/lib/postfix",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": f"mx.{b.name}.test",
        "mydomain": f"{b.name}.test",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "mynetworks": "127.0.0.0/8",
        "virtual_mailbox_domains": ", ".join(domains),
        "virtual_mailbox_maps": f"texthash:{etc}/mailboxes",
        "virtual_mailbox_base": str(base / "mail"),
        "virtual_uid_maps": "static:65534",
        "virtual_gid_maps": "static:65534",
        "virtual_mailbox_limit": "0",
        "recipient_delimiter": "+",
        "smtputf8_enable": "yes",
        "local_header_rewrite_clients": "",
        "smtp_dns_support_level": "disabled",
        "smtpd_recipient_restrictions": f"check_recipient_access texthash:{etc}/access",
        "smtpd_tls_security_level": "none",
        "smtp_tls_security_level": "none",
        "debug_peer_list": "127.0.0.1",
        "debug_peer_level": "1",
        "biff": "no",
        "maillog_file_prefixes": "/tmp, /var",
        "maillog_file": str(base / "maillog"),
    }
    if b.relayhost:
        settings["relayhost"] = b.relayhost
    if b.header_checks:
        settings["header_checks"] = f"regexp:{etc}/header_checks"
    if b.tls:
        settings |= {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": f"{etc}/cert.pem",
            "smtpd_tls_key_file": f"{etc}/key.pem",
            "smtpd_tls_loglevel": "1",
        }
    if b.sasl:
        settings |= {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "private/auth",
        }
    settings |= b.main
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


@contextlib.contextmanager
def running(b: Build) -> Iterator[Postfix]:
    """Build, start, yield and stop (by its own `postfix -c DIR stop`) one instance."""
    base = Path(tempfile.mkdtemp(prefix=f"relay-postfix-{b.name}-"))
    base.chmod(0o755)
    etc, spool, data, mail = base / "etc", base / "spool", base / "data", base / "mail"
    for d in (etc, spool, data, mail):
        d.mkdir()
    shutil.chown(data, "postfix", "postfix")
    shutil.chown(mail, 65534, 65534)
    users = list(b.mailboxes)
    domains = sorted({u.rsplit("@", 1)[1] for u in users})
    (etc / "mailboxes").write_text("".join(f"{u} {u}/\n" for u in users))
    (etc / "access").write_text("")
    (etc / "header_checks").write_text(b.header_checks)
    port = free_port()
    master = f"127.0.0.1:{port} inet n - n - - smtpd\n"
    pf = Postfix(base, port)
    if b.tls:
        ca = trustme.CA()
        cert = ca.issue_cert(f"mx.{b.name}.test", "localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(etc / "cert.pem"))
        cert.private_key_pem.write_to_path(str(etc / "key.pem"))
        ca.cert_pem.write_to_path(str(etc / "ca.pem"))
        pf.ca_file = etc / "ca.pem"
        pf.tls_port = free_port()
        master += (
            f"127.0.0.1:{pf.tls_port} inet n - n - - smtpd"
            " -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt\n"
        )
    (etc / "main.cf").write_text(_main_cf(b, base, domains))
    (etc / "master.cf").write_text(master + MASTER_CF)
    if b.sasl:
        pf.sasl = Dovecot(base, spool)
    try:
        pf.start()
        yield pf
    finally:
        with contextlib.suppress(Exception):
            pf.stop()
        shutil.rmtree(base, ignore_errors=True)
