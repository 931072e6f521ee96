"""What `relay check` and `relay auth-test` ask of the verifier: the same code
path as `relay serve`, run once, offline of any SMTP session."""

from __future__ import annotations

import asyncio
import base64
import binascii

import dkim.crypto

from relay.auth.arc import ArcKeyError, load_key

__all__ = ["ArcKeyError", "arc_key_issues", "auth_test", "check_warnings"]
from relay.auth.results import strip_own
from relay.auth.verifier import Judgement, Message, Verifier
from relay.config import Config, ConfigIssue
from relay.resolver import DnsFailure, Resolver


def arc_key_issues(cfg: Config) -> list[ConfigIssue]:
    """An unusable `auth.arc.key_file` (an error: `relay serve` would not start)."""
    arc = cfg.relay.auth.arc
    if not (arc.seal and arc.key_file and arc.key_file.is_file()):
        return []  # not sealing, or already reported by the config's own checks
    try:
        load_key(arc.key_file)
    except ArcKeyError as exc:
        loc = ("auth", "arc", "key_file")
        return [ConfigIssue(cfg.shown, cfg.line_of(loc), "auth.arc.key_file", str(exc))]
    return []


async def _warnings(cfg: Config) -> list[str]:
    s = cfg.relay
    resolver = Resolver(s.dns)
    where = f"{cfg.shown}:{cfg.line_of(('auth', 'verify')) or 1}: auth.verify"
    try:
        await resolver.records(s.domains[0], "TXT")
    except DnsFailure as exc:
        return [f"{where}: no DNS resolver answers ({exc}); every verdict would be temperror"]
    arc = s.auth.arc
    if not (arc.seal and arc.key_file and arc.selector and arc.domain):
        return []
    name = f"{arc.selector}._domainkey.{arc.domain}"
    where = f"{cfg.shown}:{cfg.line_of(('auth', 'arc', 'selector')) or 1}: auth.arc.selector"
    try:
        texts = [b"".join(r.strings) for r in await resolver.records(name, "TXT")]
    except DnsFailure as exc:
        return [f"{where}: {name} could not be looked up ({exc})"]
    if not texts:
        return [f"{where}: {name} has no TXT record: providers cannot verify the seal"]
    try:
        published = _modulus(texts[0])
        own = dkim.crypto.parse_pem_private_key(arc.key_file.read_bytes())["modulus"]
    except (ValueError, KeyError, OSError, dkim.crypto.UnparsableKeyError):
        return [f"{where}: {name} does not hold an RSA key (p=)"]
    if published != own:
        return [f"{where}: {name} publishes another key than auth.arc.key_file"]
    return []


def _modulus(record: bytes) -> int:
    tags = dict(
        (k.strip(), v.strip()) for k, _, v in (t.partition(b"=") for t in record.split(b";"))
    )
    try:
        der = base64.b64decode(b"".join(tags[b"p"].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
    return int(dkim.crypto.parse_public_key(der)["modulus"])


def check_warnings(cfg: Config) -> list[str]:
    """With auth.verify: is a resolver answering, and does the seal's selector publish
    the key of auth.arc.key_file."""
    if not cfg.relay.auth.verify:
        return []
    return asyncio.run(_warnings(cfg))


def auth_test(cfg: Config, eml: bytes, client_ip: str, mail_from: str, helo: str) -> Judgement:
    """The verdict `relay serve` would reach on `eml`, and the header fields it would
    add (shown even where auth.add_authentication_results is off)."""
    content = b"\r\n".join(eml.replace(b"\r\n", b"\n").split(b"\n"))
    if not content.endswith(b"\r\n"):
        content += b"\r\n"

    async def judge() -> Judgement:
        auth = cfg.relay.auth.model_copy(update={"add_authentication_results": True})
        settings = cfg.relay.model_copy(update={"auth": auth})
        verifier = Verifier(settings, Resolver(settings.dns))
        try:
            header, sep, body = content.partition(b"\r\n\r\n")
            if verifier.add_header:
                header = strip_own(header + b"\r\n", verifier.authserv)[:-2]
            whole = len(content) <= verifier.max_dkim_size
            msg = Message(header + sep + body if whole else header + b"\r\n\r\n", whole,
                          client_ip, mail_from, helo)  # fmt: skip
            return await verifier.judge(msg)
        finally:
            verifier.close()

    return asyncio.run(judge())
