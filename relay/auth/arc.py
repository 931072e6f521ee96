"""ARC (RFC 8617): the incoming chain validated, and our own seal for providers
that trust the relay as a sealer (Microsoft 365 `Set-ArcConfig`).

ARC is on its way to Historic at the IETF, so sealing is optional and off by
default; validation costs a lookup per set and is always part of the verdict.
"""

from __future__ import annotations

from pathlib import Path

import dkim
import dkim.crypto

from relay.auth.dkim import QUIET
from relay.auth.lookups import Lookups

# header fields the ARC-Message-Signature covers when present (dkimpy's default
# list holds Received, which the relay adds above the seal itself)
SIGNED = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"sender",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
    b"references", b"list-id",
)  # fmt: skip


class ArcKeyError(ValueError):
    """The sealing key cannot be used."""


def validate(lookups: Lookups, message: bytes) -> str:
    """The chain's validation: none (no ARC sets), pass or fail. In a worker thread."""
    if b"arc-seal:" not in message.split(b"\r\n\r\n", 1)[0].lower():
        return "none"
    probe = lookups.probe()
    cv, _results, _why = dkim.arc_verify(message, logger=QUIET, dnsfunc=probe.dkim_txt)
    return {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")


def load_key(path: Path) -> bytes:
    """The PEM private key of `auth.arc.key_file`, checked to be one dkimpy signs with."""
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ArcKeyError(f"{path}: {exc.strerror}") from None
    try:
        dkim.crypto.parse_pem_private_key(key)
    except (dkim.crypto.UnparsableKeyError, ValueError) as exc:  # binascii.Error too
        raise ArcKeyError(f"{path}: not an RSA private key in PEM form ({exc})") from None
    return key


def seal(message: bytes, selector: str, domain: str, key: bytes, authserv_id: str) -> bytes:
    """The next ARC set for `message` (which carries our Authentication-Results on top),
    as header fields ending in CRLF. In a worker thread."""
    present = {line.split(b":", 1)[0].strip().lower() for line in _fields(message)}
    fields = dkim.arc_sign(
        message, selector.encode(), domain.encode(), key, authserv_id.encode(),
        include_headers=[h for h in SIGNED if h in present],
    )  # fmt: skip
    return b"".join(fields)


def _fields(message: bytes) -> list[bytes]:
    header = message.split(b"\r\n\r\n", 1)[0]
    return [line for line in header.split(b"\r\n") if line and line[:1] not in (b" ", b"\t")]
