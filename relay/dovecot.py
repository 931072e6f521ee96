"""A private Dovecot on loopback: the real mail store behind the stand-in providers.

Used by the probe's integration tests and by `relay demo` when the `dovecot`
binary is installed (Debian: dovecot-core, dovecot-imapd, dovecot-lmtpd,
dovecot-sieve). A stand-in provider (relay.testing.Provider) hands each
message it accepted to Dovecot over LMTP; a Sieve script run before delivery
plays that provider's spam filter (inbox, `fileinto "Junk"`, another folder,
`discard`). Any login with the instance's password works (passdb static), and
XOAUTH2 is checked against an introspection URL when one is given (passdb
oauth2, as Dovecot does for real OAuth2 providers).

Every IMAP session is recorded server-side (`rawlog_dir`), so a test can read
exactly which commands a client sent. The instance runs from a world-readable
temporary folder (mail processes run as `nobody`), started with
`dovecot -c FILE` and stopped by the PID in its `master.pid`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from relay.testing import Provider, ReceivedMessage

BINARY = "dovecot"
PASSWORD = "pilot-secret"
START_TIMEOUT = 10.0


def available() -> str | None:
    """Path of the dovecot binary, or None when it is not installed."""
    return shutil.which(BINARY) or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dovecot:
    """One Dovecot instance (IMAP + LMTP + Sieve) in its own temporary folder."""

    def __init__(
        self,
        sieve: str = "",
        *,
        name: str = "dovecot",
        folders: tuple[str, ...] = (),
        oauth_introspection_url: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ):
        binary = available()
        if binary is None:
            raise RuntimeError("dovecot is not installed")
        self.binary = binary
        self.name = name
        self.sieve = sieve
        self.folders = folders
        self.oauth_url = oauth_introspection_url
        self.tls = tls  # (certificate, key) PEM files: STARTTLS on imap_port, TLS on imaps_port
        self.dir = Path(tempfile.mkdtemp(prefix=f"relay-{name}-"))
        self.dir.chmod(0o755)  # the mail processes run as nobody
        self.imap_port = _free_port()
        self.lmtp_port = _free_port()
        self.imaps_port = _free_port() if tls else 0
        self.handoff_errors: list[str] = []
        self._handoffs: set[threading.Thread] = set()
        self._lock = threading.Lock()

    # -- configuration

    def _write_config(self) -> Path:
        d = self.dir
        for sub, mode in (("base", 0o755), ("state", 0o755), ("mail", 0o777), ("rawlog", 0o777)):
            (d / sub).mkdir(exist_ok=True)
            (d / sub).chmod(mode)
        self.set_sieve(self.sieve)
        mailboxes = "".join(f'  mailbox "{f}" {{\n    auto = create\n  }}\n' for f in self.folders)
        oauth = ""
        mechanisms = "plain login"
        if self.oauth_url:
            mechanisms += " xoauth2 oauthbearer"
            (d / "oauth2.conf.ext").write_text(
                f"introspection_mode = post\nintrospection_url = {self.oauth_url}\n"
                "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
                "tokeninfo_url =\n"
            )
            oauth = (
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {d}/oauth2.conf.ext\n}}\n"
            )
        conf = f"""\
base_dir = {d}/base
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = relay-{self.name}-{self.imap_port}
listen = 127.0.0.1
ssl = no
protocols = imap lmtp
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
mail_location = maildir:{d}/mail/%u
mail_uid = nobody
mail_gid = nogroup
first_valid_uid = 0
{oauth}passdb {{
  driver = static
  mechanisms = plain login
  args = password={PASSWORD}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u allow_all_users=yes
}}
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
{mailboxes}}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol imap {{
  rawlog_dir = {d}/rawlog
}}
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  sieve_before = {d}/before.sieve
}}
"""
        if self.tls:
            cert, key = self.tls
            conf = conf.replace(
                "ssl = no\n", f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"
            ).replace(
                "  inet_listener imaps {\n    port = 0\n",
                f"  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.imaps_port}\n"
                "    ssl = yes\n",
            )
        path = d / "dovecot.conf"
        path.write_text(conf, encoding="utf-8")
        return path

    def set_sieve(self, sieve: str) -> None:
        """The filter from the next delivery on, also while running (the script is compiled
        at each delivery: its binary cannot be saved in the folder, which is root's)."""
        self.sieve = sieve
        path = self.dir / "before.sieve"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text('require ["fileinto", "mailbox"];\n' + sieve + "\n", encoding="utf-8")
        os.replace(tmp, path)

    # -- life cycle

    def start(self) -> Dovecot:
        """Start (again, on the same ports); returns once IMAP and LMTP accept connections."""
        conf = self._write_config()
        # the daemon's children inherit stdout/stderr: a pipe would never close
        with open(self.dir / "start.err", "wb") as err:
            res = subprocess.run(
                [self.binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, timeout=30,
            )  # fmt: skip
        if res.returncode != 0:
            why = (self.dir / "start.err").read_text(errors="replace").strip()
            raise RuntimeError(f"dovecot did not start: {why}")
        deadline = time.monotonic() + START_TIMEOUT
        while not (self._accepts(self.imap_port) and self._accepts(self.lmtp_port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not start: {self.log()[-2000:]}")
            time.sleep(0.02)
        return self

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def pid(self) -> int | None:
        try:
            return int((self.dir / "base" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def terminate(self) -> None:
        """Ask the master to stop (SIGTERM to its PID); `wait_stopped` waits for it."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = START_TIMEOUT) -> None:
        """Until the master is gone (it gives its log process a second) and the ports closed."""
        pid = self.pid()
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        while self._accepts(self.imap_port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def close(self) -> None:
        self.wait_handoffs()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def close_all(stores: list[Dovecot]) -> None:
        """Close several instances, stopping them in parallel (each stop takes about a second)."""
        for store in stores:
            store.wait_handoffs()
            store.terminate()
        for store in stores:
            store.close()

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- mail in

    def deliver(self, rcpts: list[str], data: bytes, mail_from: str = "") -> None:
        """Hand one message to Dovecot over LMTP (Sieve then files it)."""
        with smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=30) as lmtp:
            lmtp.sendmail(mail_from or "<>", rcpts, data)

    def attach(self, provider: Provider) -> None:
        """Have `provider` hand each message it accepts to this store (in a thread)."""
        provider.on_message = self._handoff

    def _handoff(self, message: ReceivedMessage) -> None:
        def run() -> None:
            try:
                self.deliver(message.rcpts, message.data, message.mail_from)
            except (OSError, smtplib.SMTPException) as exc:
                with self._lock:
                    self.handoff_errors.append(repr(exc))
            finally:
                with self._lock:
                    self._handoffs.discard(t)

        t = threading.Thread(target=run, name=f"{self.name}-lmtp", daemon=True)
        with self._lock:
            self._handoffs.add(t)
        t.start()

    def wait_handoffs(self, timeout: float = 30) -> None:
        """Wait until every message handed over so far has been filed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._handoffs)
            if not pending:
                return
            for t in pending:
                t.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                return

    # -- what happened

    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    def transcripts(self) -> dict[str, str]:
        """Client → server IMAP lines of every session, by rawlog file name."""
        out: dict[str, str] = {}
        for p in sorted((self.dir / "rawlog").rglob("*.in")):
            out[str(p.relative_to(self.dir / "rawlog"))] = p.read_text(errors="replace")
        return out

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / user
