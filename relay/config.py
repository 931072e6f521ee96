"""Load `relay.yaml` and the pilot file into frozen, validated settings.

Every error names the file, line and key (`PATH:LINE: KEY: message`) the way an
operator reads compiler output, and all errors of a file are reported at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import idna
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from relay.canary.config import CanarySettings
from relay.privacy import KEY_ENV
from relay.probe.config import PlacementSettings, placement_issues
from relay.yamldoc import ConfigError, ConfigIssue
from relay.yamldoc import Doc as _Doc
from relay.yamldoc import dotted as _dotted
from relay.yamldoc import pydantic_issues as _pydantic_issues
from relay.yamldoc import read_yaml as _read_yaml

AUTO_WORKERS_MAX = 16


def auto_workers() -> int:
    """`workers: auto`: the CPUs this process may use (its affinity mask, as a
    container's cpuset sets it), capped; docs/performance.md has what it buys."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, AUTO_WORKERS_MAX))


TlsMode = Literal["none", "starttls", "required", "implicit"]
PilotMode = Literal["dual", "new-only", "legacy-only"]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_domain(domain: str) -> str:
    """The form domains compare in: ASCII letters lowercased, U-labels as IDNA 2008 A-labels.

    Only ASCII is case-folded: a name that matches a listed domain only after
    Unicode folding (U+212A KELVIN SIGN for `k`, `Ü` for `ü`) is not that
    domain. A name that is not valid IDNA comes back as given (not ASCII), so
    it matches no listed domain.
    """
    d = domain.translate(_ASCII_LOWER).rstrip(".")
    if d.isascii():
        return d
    try:
        return idna.encode(d, uts46=False).decode("ascii")
    except idna.IDNAError:
        return d


def _listed_domain(domain: str) -> str:
    d = ascii_domain(domain)
    if not d.isascii():
        raise ValueError(f"{domain!r} is not a valid domain name (IDNA 2008)")
    return d


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Strict):
    host: str | tuple[str, ...] = "127.0.0.1"  # one address or a list; "::" alone: dual stack
    port: int = Field(2525, ge=0, le=65535)
    hostname: str = "relay.example.com"
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("host")
    @classmethod
    def _addresses(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        hosts = (v,) if isinstance(v, str) else v
        if not hosts:
            raise ValueError("needs at least one address")
        for host in hosts:
            ipaddress.ip_address(host)
        if len(set(hosts)) != len(hosts):
            raise ValueError("an address is listed twice")
        return v

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.host,) if isinstance(self.host, str) else self.host

    @property
    def shown(self) -> str:
        """`host:port` for messages, IPv6 in brackets, several joined by commas."""
        return ",".join(f"[{h}]" if ":" in h else h for h in self.hosts) + f":{self.port}"


class ProviderSettings(_Strict):
    host: str | tuple[str, ...] = "127.0.0.1"  # one name or a list, tried in order
    mx: str | None = None  # instead of host: the MX hosts of this domain
    port: int = Field(25, ge=1, le=65535)
    tls: TlsMode = "none"
    ca_file: Path | None = None
    username: str | None = None
    password_env: str | None = None
    auth_mechanism: Literal["plain", "login"] = "plain"
    max_connections: int = Field(4, ge=1)
    connect_timeout: float = Field(30, gt=0)
    command_timeout: float = Field(300, gt=0)
    data_timeout: float = Field(600, gt=0)
    dead_host_time: float = Field(60, ge=0)  # a host that failed to connect is skipped this long
    auth_failure_hold: float = Field(300, ge=0)  # deliveries held after an AUTH-stage failure

    @field_validator("host")
    @classmethod
    def _hosts(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        names = (v,) if isinstance(v, str) else v
        if not names or any(not n.strip("[] ") for n in names):
            raise ValueError("needs at least one host name")
        return v

    @model_validator(mode="after")
    def _host_or_mx(self) -> ProviderSettings:
        if self.mx is not None and "host" in self.model_fields_set:
            raise ValueError("set host or mx, not both")
        return self

    @property
    def hosts(self) -> tuple[str, ...]:
        """The `host` names in order; `[name]` (Postfix's literal host) is the name itself."""
        names = (self.host,) if isinstance(self.host, str) else self.host
        return tuple(n.strip().removeprefix("[").removesuffix("]") for n in names)

    @property
    def nexthop(self) -> str:
        """The destination's name, for messages: the MX domain, else the first host."""
        return self.mx or self.hosts[0]

    @property
    def destination(self) -> tuple[str, tuple[str, ...], int]:
        """What makes two providers the same next hop (shared connections, slots)."""
        return ("mx", (self.mx,), self.port) if self.mx else ("host", self.hosts, self.port)

    label: str | None = None  # shown by `relay report` instead of the name ("Zoho Mail")

    def password(self) -> str | None:
        """The secret is read at use time so it never sits in a settings dump."""
        return os.environ.get(self.password_env) if self.password_env else None


class ProvidersSettings(_Strict):
    legacy: ProviderSettings = ProviderSettings(port=2601)
    new: ProviderSettings = ProviderSettings(port=2602)


class LimitsSettings(_Strict):
    max_message_size: int = Field(52_428_800, ge=1)
    max_recipients: int = Field(100, ge=1)
    max_connections: int = Field(200, ge=1)
    max_connections_per_ip: int = Field(20, ge=1)
    idle_timeout: float = Field(300, gt=0)
    data_timeout: float = Field(600, gt=0)
    max_hops: int = Field(100, ge=1)
    max_line_length: int = Field(65_536, ge=1000)
    min_free_space: int = Field(104_857_600, ge=0)
    hard_error_limit: int = Field(20, ge=1)  # error replies in a session, then 421 and close
    junk_command_limit: int = Field(100, ge=0)  # NOOP, RSET... that still reset the idle timer


class RetrySettings(_Strict):
    schedule: tuple[float, ...] = (60, 300, 900, 3600)
    max_age: float = Field(432_000, gt=0)
    delay_warning: float | None = Field(None, gt=0)  # seconds; then one "delayed" DSN (RFC 3464)

    @field_validator("schedule")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive seconds")
        return v


class DnsSettings(_Strict):
    """The resolver for every lookup the relay makes; no nameservers: the system's."""

    nameservers: tuple[str, ...] = ()
    port: int = Field(53, ge=1, le=65535)
    timeout: float = Field(5, gt=0)

    @field_validator("nameservers")
    @classmethod
    def _addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ns in v:
            ipaddress.ip_address(ns)
        return v


class ArcSettings(_Strict):
    """ARC sealing (RFC 8617) of the copies for providers that trust the relay as a sealer."""

    seal: bool = False
    providers: tuple[Literal["legacy", "new"], ...] = ("new",)
    domain: str | None = None
    selector: str | None = None
    key_file: Path | None = None


class AuthSettings(_Strict):
    """SPF, DKIM, DMARC and ARC verdicts at the end of DATA (relay/auth/)."""

    verify: bool = False
    authserv_id: str | None = None  # default: listen.hostname
    timeout: float = Field(5, gt=0)  # seconds for all lookups of one message
    add_authentication_results: bool = False
    max_dkim_size: int = Field(10_485_760, ge=0)  # bytes; larger messages: DKIM not verified
    arc: ArcSettings = ArcSettings()


class MetricsSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(9325, ge=0, le=65535)


class ArchiveSettings(_Strict):
    """SPEC Part 2 "Safety net": an encrypted copy of each accepted message (relay/archive/)."""

    enabled: bool = False
    dir: Path = Path("../var/archive")
    scope: Literal["pilots", "all"] = "pilots"
    retention_days: int = Field(90, ge=1)
    encrypt_to: tuple[str, ...] = ()  # age X25519 recipients: the relay holds public keys only
    insecure_plaintext: bool = False  # required to run without encrypt_to

    @field_validator("encrypt_to")
    @classmethod
    def _recipients(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import pyrage  # only a config with an archive pays for the import

        for key in v:
            try:
                pyrage.x25519.Recipient.from_str(key)
            except pyrage.RecipientError:
                raise ValueError(f"{key!r} is not an age recipient (age1...)") from None
        return v


class RelaySettings(_Strict):
    listen: ListenSettings = ListenSettings()
    node: str | None = None
    domains: tuple[str, ...] = ("example.com", "dev.example.com")
    forward_domains: dict[str, str] = {}
    forward_networks: tuple[str, ...] = ()
    pilots: str = "pilot-users.yaml"
    recipient_delimiter: str = "+"
    recipients: str | None = None  # the valid addresses, one a line; others get 550 5.1.1
    verify_recipients: bool = False
    verify_timeout: float = Field(10, gt=0)
    providers: ProvidersSettings = ProvidersSettings()
    bounce: ProviderSettings | None = None
    spool: Path = Path("../var/spool")
    log: Path = Path("../var/deliveries.jsonl")
    limits: LimitsSettings = LimitsSettings()
    bare_newline: Literal["normalize", "reject"] = "normalize"
    retry: RetrySettings = RetrySettings()
    shutdown_timeout: float = Field(30, ge=0)
    metrics: MetricsSettings = MetricsSettings()
    dns: DnsSettings = DnsSettings()
    auth: AuthSettings = AuthSettings()
    # "auto": one process per CPU this process may run on (at most AUTO_WORKERS_MAX),
    # resolved when the file is read; 1 when listen.port is 0 (nothing to share)
    workers: int = Field(1, ge=1, le=64)
    pid_file: Path | None = None
    log_buffer: int = Field(10_000, ge=0)
    log_privacy: Literal["plain", "hash"] = "plain"  # hash: addresses pseudonymized (privacy.py)
    archive: ArchiveSettings = ArchiveSettings()
    placement: PlacementSettings = PlacementSettings()
    canary: CanarySettings = CanarySettings()

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("workers", "auto") == "auto":
            listen = data.get("listen")
            port = listen.get("port", 2525) if isinstance(listen, dict) else 2525
            data = {**data, "workers": auto_workers() if port else 1}
        return data

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one domain is needed")
        return tuple(_listed_domain(d) for d in v)

    @field_validator("forward_domains")
    @classmethod
    def _fwd(cls, v: dict[str, str]) -> dict[str, str]:
        return {_listed_domain(k): _listed_domain(d) for k, d in v.items()}

    @field_validator("forward_networks")
    @classmethod
    def _nets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()


class PilotEntry(_Strict):
    address: str
    group: str | None = None
    mode: PilotMode = "dual"
    new_address: str | None = None
    cutover_at: datetime | None = None
    probe: bool = True  # false: the placement probe never looks into this user's mailboxes

    @field_validator("address", "new_address")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is not None and (v.count("@") != 1 or v.startswith("@") or v.endswith("@")):
            raise ValueError(f"not an address: {v!r}")
        return v


class PilotFile(_Strict):
    new_domains: dict[str, str] = {}
    pilots: tuple[PilotEntry, ...] = ()

    @field_validator("new_domains")
    @classmethod
    def _ascii(cls, v: dict[str, str]) -> dict[str, str]:
        return {_listed_domain(k): _listed_domain(d) for k, d in v.items()}


# --- loading -----------------------------------------------------------------


def _resolve_paths(settings: RelaySettings, base: Path) -> RelaySettings:
    def rel(p: Path | None) -> Path | None:
        return None if p is None else (base / p).resolve()

    def provider(p: ProviderSettings) -> ProviderSettings:
        return p.model_copy(update={"ca_file": rel(p.ca_file)})

    return settings.model_copy(
        update={
            "listen": settings.listen.model_copy(
                update={
                    "tls_cert": rel(settings.listen.tls_cert),
                    "tls_key": rel(settings.listen.tls_key),
                }
            ),
            "spool": rel(settings.spool),
            "pid_file": rel(settings.pid_file),
            "log": rel(settings.log),
            "providers": ProvidersSettings(
                legacy=provider(settings.providers.legacy), new=provider(settings.providers.new)
            ),
            "bounce": provider(settings.bounce) if settings.bounce else None,
            "auth": settings.auth.model_copy(
                update={
                    "arc": settings.auth.arc.model_copy(
                        update={"key_file": rel(settings.auth.arc.key_file)}
                    )
                }
            ),
            "archive": settings.archive.model_copy(update={"dir": rel(settings.archive.dir)}),
            "placement": settings.placement.resolved(base),
            "canary": settings.canary.resolved(base),
        }
    )


@dataclass(frozen=True)
class Config:
    """Both files, validated together, plus where they came from."""

    relay: RelaySettings
    pilots: PilotFile
    path: Path
    pilots_path: Path
    pilots_shown: str
    shown: str = ""
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    recipients: RecipientsFile | None = None  # `recipients:` as loaded at start
    recipients_path: Path | None = None

    @property
    def recipients_shown(self) -> str:
        """The recipients file's path as messages name it (relative to `-c`'s folder)."""
        return os.path.join(os.path.dirname(self.shown), self.relay.recipients or "")

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """Line of a key of relay.yaml (or of its nearest enclosing key)."""
        return _Doc(self.shown, None, self.lines).line_of(loc)


def _providers(settings: RelaySettings) -> list[tuple[tuple[str, ...], ProviderSettings]]:
    named = [(("providers", n), getattr(settings.providers, n)) for n in ("legacy", "new")]
    return named + ([(("bounce",), settings.bounce)] if settings.bounce else [])


def missing_secrets(cfg: Config) -> list[ConfigIssue]:
    """Secrets named by `password_env` that are not set: fatal for `relay serve` only.

    `relay check` shows them as warnings and `relay queue` / `relay route` never
    look, so an operator can inspect a queue without holding the passwords.
    """
    issues = [
        ConfigIssue(
            cfg.shown,
            cfg.line_of((*loc, "password_env")),
            _dotted((*loc, "password_env")),
            f"environment variable {p.password_env} is not set",
        )
        for loc, p in _providers(cfg.relay)
        if p.password_env and os.environ.get(p.password_env) is None
    ]
    if cfg.relay.log_privacy == "hash" and not os.environ.get(KEY_ENV):
        issues.append(
            ConfigIssue(
                cfg.shown,
                cfg.line_of(("log_privacy",)),
                "log_privacy",
                f"environment variable {KEY_ENV} is not set (the pseudonym key)",
            )
        )
    return issues


def _relay_warnings(settings: RelaySettings, shown: str, doc: _Doc) -> list[str]:
    warnings = []
    archive = settings.archive
    if archive.enabled and archive.insecure_plaintext and not archive.encrypt_to:
        line = doc.line_of(("archive", "insecure_plaintext")) or 1
        warnings.append(
            f"{shown}:{line}: archive.insecure_plaintext: the archive keeps messages in clear; "
            "anyone who can read its directory reads the pilot users' mail"
        )
    if settings.bounce is None:
        warnings.append(
            f"{shown}:{doc.line_of(('bounce',)) or 1}: bounce: not set; bounces go through the "
            "legacy provider's settings, which works only where that provider lets this host "
            "relay (Google Workspace SMTP relay, a Microsoft 365 connector)"
        )
    return warnings


def _relay_issues(settings: RelaySettings, doc: _Doc) -> list[ConfigIssue]:
    issues = []
    for loc, p in _providers(settings):
        issues += _provider_issues(p, loc, doc)
        if p.mx is not None and p.mx.lower().rstrip(".") in settings.domains:
            sub = (*loc, "mx")
            msg = f"{p.mx} is in domains: its MX is this relay (a mail loop)"
            issues.append(ConfigIssue(doc.path, doc.line_of(sub), _dotted(sub), msg))
    if (settings.listen.tls_cert is None) != (settings.listen.tls_key is None):
        loc = ("listen", "tls_cert" if settings.listen.tls_cert else "tls_key")
        issues.append(
            ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), "set both tls_cert and tls_key")
        )
    for key in ("tls_cert", "tls_key"):
        value = getattr(settings.listen, key)
        if value is not None and not value.is_file():
            where = ("listen", key)
            issues.append(
                ConfigIssue(
                    doc.path, doc.line_of(where), _dotted(where), f"{value}: file not found"
                )
            )
    if settings.workers > 1 and settings.listen.port == 0:
        msg = "workers > 1 needs a fixed listen.port (the workers share it)"
        issues.append(ConfigIssue(doc.path, doc.line_of(("workers",)), "workers", msg))
    if settings.metrics.port and settings.metrics.port + settings.workers - 1 > 65535:
        msg = f"worker metrics ports {settings.metrics.port}+0..{settings.workers - 1} exceed 65535"
        issues.append(ConfigIssue(doc.path, doc.line_of(("workers",)), "workers", msg))
    issues += _arc_issues(settings.auth, doc)
    archive = settings.archive
    if archive.enabled and not archive.encrypt_to and not archive.insecure_plaintext:
        loc = ("archive", "encrypt_to")
        msg = "needed when the archive is enabled (or insecure_plaintext: true)"
        issues.append(ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), msg))
    for loc, msg in placement_issues(settings.placement):
        issues.append(ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), msg))
    overlap = set(settings.forward_domains) & set(settings.domains)
    if overlap:
        msg = f"{', '.join(sorted(overlap))} also listed in domains"
        issues.append(
            ConfigIssue(doc.path, doc.line_of(("forward_domains",)), "forward_domains", msg)
        )
    for fwd, real in settings.forward_domains.items():
        if real not in settings.domains:
            loc = ("forward_domains", fwd)
            msg = f"maps to {real}, which is not in domains"
            issues.append(ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), msg))
    return issues


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _arc_issues(auth: AuthSettings, doc: _Doc) -> list[ConfigIssue]:
    """ARC sealing needs our own verdict to seal and a key to sign with (the key's
    content is checked by `relay check` and at start, relay/auth/arc.py)."""
    arc = auth.arc
    if not arc.seal:
        return []
    issues = []

    def add(key: str, msg: str) -> None:
        loc = ("auth", "arc", key) if key else ("auth", "arc", "seal")
        issues.append(ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), msg))

    if not (auth.verify and auth.add_authentication_results):
        add("", "needs auth.verify and auth.add_authentication_results (the seal carries them)")
    for key in ("domain", "selector"):
        value = getattr(arc, key)
        if not value:
            add(key, "needed with seal: true")
        elif not all(_LABEL.fullmatch(part) for part in value.rstrip(".").split(".")):
            add(key, f"{value!r} is not a DNS name")
    if arc.key_file is None:
        add("key_file", "needed with seal: true")
    elif not arc.key_file.is_file():
        add("key_file", f"{arc.key_file}: file not found")
    if not arc.providers:
        add("providers", "name at least one provider to seal for")
    return issues


def _provider_issues(p: ProviderSettings, loc: tuple[str, ...], doc: _Doc) -> list[ConfigIssue]:
    issues = []
    if p.username and not p.password_env:
        sub = (*loc, "password_env")
        issues.append(
            ConfigIssue(
                doc.path, doc.line_of((*loc, "username")), _dotted(sub), "needed with username"
            )
        )
    if p.ca_file is not None and not p.ca_file.is_file():
        sub = (*loc, "ca_file")
        issues.append(
            ConfigIssue(doc.path, doc.line_of(sub), _dotted(sub), f"{p.ca_file}: file not found")
        )
    return issues


def load_relay(path: str | os.PathLike[str]) -> tuple[RelaySettings, _Doc]:
    shown = os.fspath(path)
    doc = _read_yaml(Path(path), shown)
    try:
        settings = RelaySettings.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_issues(doc, exc)) from None
    settings = _resolve_paths(settings, Path(path).resolve().parent)
    issues = _relay_issues(settings, doc)
    if issues:
        raise ConfigError(issues)
    return settings, doc


def load_pilots(path: Path, shown: str, relay: RelaySettings) -> PilotFile:
    """Parse and cross-check the pilot file against `relay`'s domains."""
    doc = _read_yaml(path, shown)
    try:
        pilots = PilotFile.model_validate(doc.data)
        issues = _pilot_issues(pilots.pilots, range(len(pilots.pilots)), pilots, relay, doc)
    except ValidationError as exc:
        # Still cross-check the entries that are valid on their own: all errors at once.
        issues = _pydantic_issues(doc, exc)
        raw = doc.data.get("pilots")
        valid: list[tuple[int, PilotEntry]] = []
        for i, item in enumerate(raw if isinstance(raw, list) else []):
            try:
                valid.append((i, PilotEntry.model_validate(item)))
            except ValidationError:
                continue
        try:
            base = PilotFile.model_validate({"new_domains": doc.data.get("new_domains") or {}})
        except ValidationError:
            base = PilotFile()
        issues += _pilot_issues([e for _, e in valid], [i for i, _ in valid], base, relay, doc)
        issues.sort(key=lambda x: x.line or 0)
    if issues:
        raise ConfigError(issues)
    return pilots


def _pilot_issues(
    entries: Sequence[PilotEntry],
    indexes: Sequence[int],
    pf: PilotFile,
    relay: RelaySettings,
    doc: _Doc,
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def add(i: int, key: str, msg: str) -> None:
        loc = ("pilots", i, key)
        issues.append(ConfigIssue(doc.path, doc.line_of(loc), _dotted(loc), msg))

    seen: dict[str, int] = {}
    domains = set(relay.domains)
    for i, e in zip(indexes, entries, strict=True):
        local, _, domain = e.address.rpartition("@")
        domain = ascii_domain(domain)
        key = e.address.lower()
        if key in seen:
            first = doc.line_of(("pilots", seen[key]))
            add(i, "address", f"duplicate of the entry on line {first}")
        else:
            seen[key] = i
        if domain not in domains:
            add(i, "address", f"domain {domain} is not in domains ({', '.join(relay.domains)})")
        wildcard = local == "*"
        if wildcard and e.new_address:
            add(i, "new_address", "not allowed on a wildcard entry")
        needs_new = e.mode != "legacy-only"
        if needs_new and not e.new_address and domain not in pf.new_domains:
            add(i, "address", f"no new address: set new_address or new_domains[{domain}]")
        if e.cutover_at is not None:
            if e.cutover_at.tzinfo is None or e.cutover_at.utcoffset() is None:
                add(i, "cutover_at", "needs a UTC offset (e.g. 2031-03-01T18:00:00+01:00)")
            if e.mode != "dual":
                add(i, "cutover_at", f"only allowed with mode dual, not {e.mode}")
    return issues


@dataclass(frozen=True)
class RecipientsFile:
    """The valid recipients (`recipients:`): addresses lowercased with their domain in
    ASCII form, and the domains of `*@domain` lines."""

    addresses: frozenset[str] = frozenset()
    wildcards: frozenset[str] = frozenset()


def load_recipients(path: Path, shown: str, relay: RelaySettings) -> RecipientsFile:
    """One address a line, `#` to the end of a line a comment, `*@domain` every address of
    that domain; an address outside `domains` is an error (it could never be used)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(shown, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(shown, None, "", str(exc))]) from None
    addresses, wildcards, issues = set(), set(), []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        local, at, domain = line.rpartition("@")
        domain = ascii_domain(domain)
        if not at or not local or not domain or any(c.isspace() for c in line):
            issues.append(ConfigIssue(shown, n, "", f"not an address: {line!r}"))
        elif domain not in relay.domains:
            issues.append(ConfigIssue(shown, n, "", f"domain {domain} is not in domains"))
        elif local == "*":
            wildcards.add(domain)
        else:
            addresses.add(f"{local.lower()}@{domain}")
    if issues:
        raise ConfigError(issues)
    return RecipientsFile(frozenset(addresses), frozenset(wildcards))


def load(path: str | os.PathLike[str]) -> Config:
    """Load relay.yaml and its pilot file; raise ConfigError listing every problem."""
    relay, doc = load_relay(path)
    pilots_path = (Path(path).resolve().parent / relay.pilots).resolve()
    shown = os.path.join(os.path.dirname(os.fspath(path)), relay.pilots)
    pilots = load_pilots(pilots_path, shown, relay)
    recipients_path = recipients = None
    if relay.recipients is not None:
        recipients_path = (Path(path).resolve().parent / relay.recipients).resolve()
        recipients_shown = os.path.join(os.path.dirname(os.fspath(path)), relay.recipients)
        recipients = load_recipients(recipients_path, recipients_shown, relay)
    return Config(
        relay=relay,
        pilots=pilots,
        path=Path(path).resolve(),
        pilots_path=pilots_path,
        pilots_shown=shown,
        shown=os.fspath(path),
        lines=doc.lines,
        warnings=tuple(_relay_warnings(relay, os.fspath(path), doc)),
        recipients=recipients,
        recipients_path=recipients_path,
    )
