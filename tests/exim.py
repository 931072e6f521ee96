"""A private Exim 4.96 on loopback (slow tests): Debian's own build, never installed.

RECIPES.md "Exim as the other provider": exim4-daemon-light conflicts with
postfix, so its .debs are fetched with `apt-get download` into `CACHE` (reused
between runs; `.ci/run` fills it too), unpacked with `dpkg -x`, and the daemon
runs under `unshare -m --propagation private` with its own /etc/passwd and
/etc/group (adding Debian-exim, which the Debian build wants before it reads
its config) and an ld.so.cache that finds the unpacked libidn, bind-mounted
in that mount namespace only.

One instance per module (`exim_fixture`): spool, logs and maildirs in a
temporary folder, a plain port with STARTTLS and an implicit-TLS port
(`tls_on_connect_ports`), a certificate from the suite's test CA. What it
offers is switched per test by files (`Exim.switch`), read at each EHLO:
`no-starttls` (tls_advertise_hosts empty), `broken-tls` (its certificate
file missing: STARTTLS offered, then `454 TLS currently unavailable`),
`client-cert` (a client certificate required: the handshake fails),
`no-smtputf8`, `dsn` (DSN is offered only then, as in Exim's default). Its other rules:
`recipients_max = 3` (more get Exim's bare `452 too many recipients`),
`refused@` gets a multi-line `550` at RCPT, a message with a header
`X-Test-Deny: yes` a multi-line `550` at DATA, and `disabled@` is accepted
and then fails in routing (Exim then bounces to the sender, unless told
NOTIFY=NEVER).

Started with `-C`, Exim gives up root (the config is not in Debian's
TRUSTED_CONFIG_LIST), so it runs, and delivers, as Debian-exim: a uid no
real account uses here, owning the spool, logs and mail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.harness import free_port
from tests.test_delivery import until

PACKAGES = ("exim4-daemon-light", "exim4-base", "exim4-config", "libidn12")
CACHE = Path(os.environ.get("RELAY_TEST_EXIM_CACHE", "/var/cache/relay-tests/exim"))
DOMAINS = ("example.com", "example-new.com", "dev.example-new.com")  # legacy's, new's
LOCAL_PARTS = (
    "alice",
    "zed",
    "robert",
    "jürgen",
    "refused",
    "disabled",
    *(f"r{i}" for i in range(1, 7)),
)
HOSTNAME = "mx.exim.test"
RECIPIENTS_MAX = 3


def download(cache: Path = CACHE) -> list[Path]:
    """The packages' .debs in `cache`, fetched with `apt-get download` when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(cache.glob(f"{p}_*.deb"))]
    if missing:
        r = subprocess.run(
            ["apt-get", "download", "-q", *missing],
            cwd=cache, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(missing)}: {r.stderr.strip()[-300:]}")
    return sorted(next(iter(sorted(cache.glob(f"{p}_*.deb")))) for p in PACKAGES)


def unpacked(cache: Path = CACHE) -> Path:
    """The packages unpacked into one root under `cache` (once per set of .debs; a
    concurrent run that unpacked the same set first wins, and its root stays put)."""
    debs = download(cache)
    stamp = "\n".join(d.name for d in debs) + "\n"
    root = cache / "root"

    def current() -> bool:
        return (root / ".unpacked").exists() and (root / ".unpacked").read_text() == stamp

    if current():
        return root
    work = Path(tempfile.mkdtemp(prefix="root.", dir=cache))
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(work)], check=True, timeout=120)
    (work / ".unpacked").write_text(stamp)
    if current():
        shutil.rmtree(work)
        return root
    stale = Path(tempfile.mkdtemp(prefix="stale.", dir=cache))
    with contextlib.suppress(FileNotFoundError):
        root.rename(stale / "root")  # another set of .debs (an update)
    try:
        work.rename(root)
    except OSError:  # another run's root got there first
        shutil.rmtree(work)
    shutil.rmtree(stale, ignore_errors=True)
    return root


def unavailable() -> str | None:
    """Why a private Exim cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, bind mounts)"
    for tool in ("unshare", "dpkg", "apt-get", "ldconfig"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"needs {tool}"
    try:
        unpacked()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"Exim's .debs unavailable (no apt access?): {exc}"
    return None


def _free_id() -> int:
    """A uid and gid that no account or group on this machine has."""
    used = {
        int(line.split(":")[2])
        for f in ("/etc/passwd", "/etc/group")
        for line in Path(f).read_text().splitlines()
        if line.count(":") >= 2
    }
    return next(i for i in range(64999, 60000, -1) if i not in used)


def _config(base: Path, root: Path, port: int, tls_port: int) -> str:
    switch, etc = base / "switch", base / "etc"
    broken = f"exists{{{switch}/broken-tls}}"
    return f"""keep_environment =
exim_path = {root}/usr/sbin/exim4
primary_hostname = {HOSTNAME}
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
pid_file_path = {base}/exim.pid
log_selector = +smtp_connection +received_recipients +tls_cipher +smtp_protocol_error
local_interfaces = 127.0.0.1
daemon_smtp_ports = {port} : {tls_port}
tls_on_connect_ports = {tls_port}
tls_certificate = ${{if {broken}{{{etc}/missing.pem}}{{{etc}/cert.pem}}}}
tls_privatekey = ${{if {broken}{{{etc}/missing.pem}}{{{etc}/key.pem}}}}
tls_verify_hosts = ${{if exists{{{switch}/client-cert}}{{*}}{{}}}}
tls_verify_certificates = {base}/etc/ca.pem
smtp_accept_queue_per_connection = 0
tls_advertise_hosts = ${{if exists{{{switch}/no-starttls}}{{}}{{*}}}}
smtputf8_advertise_hosts = ${{if exists{{{switch}/no-smtputf8}}{{}}{{*}}}}
dsn_advertise_hosts = ${{if exists{{{switch}/dsn}}{{*}}{{}}}}
recipients_max = {RECIPIENTS_MAX}
message_size_limit = 50M
host_lookup =
rfc1413_hosts =
domainlist local_domains = {" : ".join(DOMAINS)}
acl_smtp_rcpt = acl_rcpt
acl_smtp_data = acl_data

begin acl
acl_rcpt:
  deny    local_parts = refused
          message = 5.7.1 refused by policy: first line\\nsecond line of the refusal
  accept  domains = +local_domains
          local_parts = lsearch;{base}/etc/local_parts
  deny    message = 5.1.1 unknown user
acl_data:
  deny    condition = ${{if eq{{$h_X-Test-Deny:}}{{yes}}}}
          message = 5.7.1 content refused: first line\\nsecond line of the refusal
  accept

begin routers
disabled:
  driver = redirect
  domains = +local_domains
  local_parts = disabled
  allow_fail
  data = :fail: 5.2.1 mailbox disabled
mailbox:
  driver = accept
  domains = +local_domains
  local_parts = lsearch;{base}/etc/local_parts
  transport = maildir

begin transports
maildir:
  driver = appendfile
  directory = {base}/mail/$domain_data/$local_part_data
  maildir_format
  create_directory
  use_crlf
  user = Debian-exim
  group = Debian-exim
  mode = 0600

begin retry
* * F,1h,1m
"""


@dataclass
class Exim:
    """A private Exim: its ports, CA file, logs and maildirs."""

    base: Path
    root: Path
    port: int
    tls_port: int
    ca_file: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def mainlog(self) -> str:
        return self.read("mainlog")

    def read(self, log: str) -> str:
        path = self.base / "log" / log
        return path.read_text(errors="replace") if path.exists() else ""

    def log_of(self, exim_id: str) -> list[str]:
        """The mainlog lines about one message (its id after the time stamp)."""
        return [line for line in self.mainlog.splitlines() if f" {exim_id} " in line]

    def arrival(self, exim_id: str) -> str:
        """The message's `<=` line (its reception)."""
        [line] = [line for line in self.log_of(exim_id) if f" {exim_id} <= " in line]
        return line

    def mailbox(self, address: str) -> list[bytes]:
        """The messages delivered into `address`'s maildir, oldest first."""
        local, domain = address.rsplit("@", 1)
        folder = self.base / "mail" / domain / local / "new"
        if not folder.is_dir():
            return []
        files = sorted(folder.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def find(self, address: str, needle: bytes) -> list[bytes]:
        """The messages in `address`'s maildir that contain `needle`."""
        return [m for m in self.mailbox(address) if needle in m]

    async def stored(self, address: str, needle: bytes, n: int = 1) -> list[bytes]:
        """The `n` messages containing `needle` in `address`'s maildir, once they are
        there (Exim delivers after its 250); more than `n` fails."""
        found: list[bytes] = await until(
            lambda: (lambda m: m if len(m) >= n else None)(self.find(address, needle)),
            30, f"{n} messages with {needle!r} in {address}'s maildir",
        )  # fmt: skip
        assert len(found) == n, f"{len(found)} messages with {needle!r} in {address}'s maildir"
        return found

    def settings(self, tls: str = "none", **keys: Any) -> dict[str, Any]:
        """Provider settings for this instance (its implicit-TLS port for `implicit`)."""
        port = self.tls_port if tls == "implicit" else self.port
        cfg: dict[str, Any] = {"host": "127.0.0.1", "port": port, "tls": tls, "command_timeout": 10}
        if tls in ("required", "implicit"):
            cfg["ca_file"] = str(self.ca_file)
        return cfg | keys

    @contextlib.contextmanager
    def switch(self, name: str) -> Iterator[None]:
        """Turn on a switch of the config (see the module doc) for a block."""
        flag = self.base / "switch" / name
        flag.touch()
        try:
            yield
        finally:
            flag.unlink()

    def start(self) -> None:
        """Run the daemon in the foreground (-bdf), in a mount namespace of its own."""
        etc = self.base / "etc"
        mounts = " && ".join(
            f"mount --bind {etc / name} /etc/{name}" for name in ("passwd", "group", "ld.so.cache")
        )
        exim = f"exec {self.root}/usr/sbin/exim4 -C {etc}/exim.conf -bdf"
        ports = f"-oX '{self.port}:{self.tls_port}'"
        with open(self.base / "stderr", "ab") as stderr:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c",
                 f"{mounts} && {exim} {ports}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
        started = f"daemon started: pid={self.proc.pid},"  # sh and unshare exec: the same pid
        deadline = time.monotonic() + 20
        while started not in self.mainlog:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stderr = (self.base / "stderr").read_text(errors="replace")
                raise RuntimeError(f"exim did not start: {stderr}{self.read('paniclog')}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to the daemon's process group (its session: the daemon and the
        children serving open connections, which outlive the daemon), and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def make(base: Path, ca: trustme.CA) -> Exim:
    """Write an instance's folders and config under `base` (not started)."""
    root = unpacked()
    base.chmod(0o755)  # Exim runs as Debian-exim and must get in
    ident = _free_id()
    etc = base / "etc"
    for d in ("etc", "spool", "log", "mail", "switch"):
        (base / d).mkdir()
    for d in ("spool", "log", "mail"):
        os.chown(base / d, ident, ident)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    (etc / "passwd").write_text(
        passwd + f"Debian-exim:x:{ident}:{ident}::/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text(group + f"Debian-exim:x:{ident}:\n")
    system = [
        line
        for conf in sorted(Path("/etc/ld.so.conf.d").glob("*.conf"))
        for line in conf.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    (etc / "ld.so.conf").write_text("\n".join([f"{root}/usr/lib/x86_64-linux-gnu", *system]) + "\n")
    subprocess.run(
        ["ldconfig", "-X", "-C", str(etc / "ld.so.cache"), "-f", str(etc / "ld.so.conf")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    cert = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(etc / "cert.pem"))
    cert.private_key_pem.write_to_path(str(etc / "key.pem"))
    (etc / "key.pem").chmod(0o644)  # read by Debian-exim; a throwaway test key
    ca.cert_pem.write_to_path(str(etc / "ca.pem"))
    (etc / "local_parts").write_text("".join(f"{p}: {p}\n" for p in LOCAL_PARTS))
    port, tls_port = free_port(), free_port()
    while tls_port == port:
        tls_port = free_port()
    (etc / "exim.conf").write_text(_config(base, root, port, tls_port))
    return Exim(base, root, port, tls_port, etc / "ca.pem")


@pytest.fixture(scope="module", name="exim")
def exim_fixture(ca: trustme.CA) -> Iterator[Exim]:
    """A running private Exim for the module (skipped where it cannot run)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="relay-exim-"))
    server = make(base, ca)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
