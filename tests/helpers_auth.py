"""Authentication test material: DKIM/ARC keys made per run, a zone that holds
them, messages signed with them, and an SMTP client on another loopback address
(127.0.0.2 is authorised by the zone's SPF records, 127.0.0.3 is not)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cache

import aiosmtplib
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AUTHORISED, UNAUTHORISED = "127.0.0.2", "127.0.0.3"
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


@dataclass(frozen=True)
class Key:
    private: bytes  # PEM (PKCS#1), as dkimpy and auth.arc.key_file take it
    record: str  # the TXT record's text

    def zone_txt(self) -> str:
        """The record as zone-file strings of at most 255 octets each."""
        return " ".join(f'"{self.record[i : i + 200]}"' for i in range(0, len(self.record), 200))


@cache
def key(name: str) -> Key:
    """A 2048-bit RSA key, one per name and test run (its TXT answer needs TCP)."""
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )  # fmt: skip
    der = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


def zone() -> str:
    """example.org: SPF for 127.0.0.2 only, DMARC p=reject, DKIM selector s1;
    nopolicy.example.net: SPF, no DMARC; plain.example: nothing at all;
    seal.example.com: the relay's ARC sealing key (selector arc1)."""
    return (
        'example.org. 300 IN TXT "v=spf1 ip4:127.0.0.2 -all"\n'
        '_dmarc.example.org. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:d@example.org"\n'
        f"s1._domainkey.example.org. 300 IN TXT {key('example.org').zone_txt()}\n"
        'nopolicy.example.net. 300 IN TXT "v=spf1 ip4:127.0.0.2 -all"\n'
        "plain.example. 300 IN A 127.0.0.9\n"
        f"arc1._domainkey.seal.example.com. 300 IN TXT {key('seal.example.com').zone_txt()}\n"
    )


def message(from_addr: str, body: bytes = b"Hello\r\n", extra: bytes = b"") -> bytes:
    return (
        extra
        + f"From: Someone <{from_addr}>\r\nTo: alice@example.com\r\nSubject: test\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <t.{from_addr}>\r\n\r\n".encode()
        + body
    )


def signed(
    data: bytes, domain: str = "example.org", selector: str = "s1", key_name: str | None = None
) -> bytes:
    """`data` with a DKIM-Signature of `domain` on top (relaxed/simple, as most signers),
    made with `key(key_name or domain)`."""
    sig = dkim.sign(
        data, selector.encode(), domain.encode(), key(key_name or domain).private,
        canonicalize=(b"relaxed", b"simple"), include_headers=SIGNED_HEADERS,
    )  # fmt: skip
    return sig + data


async def send_from(
    source: str, port: int, sender: str, rcpts: list[str], data: bytes, helo: str = "client.test"
) -> str:
    """One message from the loopback address `source`; the queue id from the 250."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15,
                           source_address=(source, 0), local_hostname=helo)  # fmt: skip
    await smtp.connect()
    try:
        errors, reply = await smtp.sendmail(sender, rcpts, data)
        assert not errors, errors
        return reply.rsplit(" ", 1)[1]
    finally:
        await smtp.quit()
