"""swaks, a real SMTP client, against an in-process relay (plain and STARTTLS)."""

# ruff: noqa: F811 - the relay_factory fixture is imported, then named as a parameter
from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
import trustme

from tests.conftest import read_content
from tests.helpers_ingress import (
    HOSTNAME,
    RelayEnv,
    RelayFactory,
    relay_factory,  # noqa: F401
    spool_messages,
)

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed"),
]


async def swaks(env: RelayEnv, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(env.port), "--ehlo", "swaks.test",
        "--from", "sender@origin.test", "--timeout", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


def queued(out: str) -> str:
    m = re.search(r"<[-~]  250 2\.0\.0 Ok: queued as (\S+)", out)  # "~": under TLS
    assert m, out
    return m.group(1)


async def test_swaks_pilot_gets_250(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    code, out = await swaks(env, "--to", "alice@example.com", "--header", "Subject: swaks test")
    assert code == 0, out
    qid = queued(out)
    assert qid in spool_messages(env.spool_queue)
    (ev,) = env.events("received")
    assert [(p["provider"], p["role"]) for p in ev["plan"]] == [
        ("legacy", "primary"),
        ("new", "shadow"),
    ]
    assert b"Subject: swaks test" in read_content(env.relay.spool, qid)


async def test_swaks_pipelining(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    code, out = await swaks(env, "--pipeline", "--to", "alice@example.com,bob@example.com")
    assert code == 0, out
    queued(out)


async def test_swaks_relay_denied(relay_factory: RelayFactory) -> None:
    env = await relay_factory()
    code, out = await swaks(env, "--to", "someone@elsewhere.org")
    assert code != 0
    assert "<** 550 5.7.1 Relaying denied" in out, out
    assert [(e["stage"], e["smtp_code"], e["enhanced_code"]) for e in env.events("rejected")] == [
        ("rcpt", 550, "5.7.1")
    ]
    assert spool_messages(env.spool_queue) == {}


async def test_swaks_starttls_with_verified_certificate(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    env = await relay_factory(
        listen=f", tls_cert: {tmp_path / 'cert.pem'}, tls_key: {tmp_path / 'key.pem'}"
    )
    code, out = await swaks(
        env, "--tls", "--tls-verify", "--tls-ca-path", str(tmp_path / "ca.pem"),
        "--to", "alice@example.com",
    )  # fmt: skip
    assert code == 0, out
    assert "TLS started" in out, out
    qid = queued(out)
    assert b" with ESMTPS id " + qid.encode() in read_content(env.relay.spool, qid)
