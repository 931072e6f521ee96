"""Authentication verdicts at ingress (SPEC Part 2 "Judging fairly"): a real DNS
server on loopback with a zone per test, clients on 127.0.0.2 (authorised by
SPF) and 127.0.0.3 (not), DKIM keys made per run."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import pytest

from relay.records import parse_envelope
from tests.harness import RelayEnv
from tests.helpers_auth import AUTHORISED, UNAUTHORISED, key, message, send_from, signed
from tests.helpers_dns import LoopbackDNS

MakeEnv = Callable[..., Awaitable[RelayEnv]]
AUTHSERV = "relay.example.com"  # the relay_env fixture's listen.hostname


def auth_yaml(server: LoopbackDNS, **auth: Any) -> dict[str, Any]:
    settings = {"verify": True, "add_authentication_results": True, "timeout": 3} | auth
    return {
        "dns": {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2},
        "auth": settings,
    }


async def copies(env: RelayEnv, qid: str) -> dict[str, bytes]:
    """Each provider's copy of message `qid` (alice@example.com is a dual pilot)."""
    assert env.legacy is not None and env.new is not None
    trace = f"X-Relay-Trace: test-node {qid}".encode()

    def found() -> dict[str, bytes]:
        return {
            p.name: m.data for p in (env.legacy, env.new) for m in p.messages if trace in m.data
        }

    await env.wait_for(lambda: len(found()) == 2, what="both copies")
    return found()


def expect(
    spf: str, domain: str, dkim: str | None, dmarc: str, policy: str | None, cls: str
) -> dict[str, Any]:
    """The `auth` of a received event: SPF's and From's domain are `domain`; `dkim` is the
    result of its one signature (None: unsigned); ARC is always none here."""
    sigs = [] if dkim is None else [{"domain": domain, "result": dkim}]
    return {
        "spf": spf, "spf_domain": domain, "dkim": sigs, "dmarc": dmarc, "dmarc_policy": policy,
        "arc": "none", "from_domain": domain, "class": cls,
    }  # fmt: skip


ORG, NOPOLICY, PLAIN, SLOW = "example.org", "nopolicy.example.net", "plain.example", "slow.example"
CASES = {  # name: (client address, MAIL FROM, content, the verdict the zone implies)
    "aligned_pass": (AUTHORISED, "a@example.org", signed(message("a@example.org")),
                     expect("pass", ORG, "pass", "pass", "reject", "aligned_pass")),
    "aligned_pass_by_dkim_alone": (
        UNAUTHORISED, "bounces@example.org", signed(message("a@example.org")),
        expect("fail", ORG, "pass", "pass", "reject", "aligned_pass")),
    "auth_no_policy": (AUTHORISED, "n@nopolicy.example.net", message("n@nopolicy.example.net"),
                       expect("pass", NOPOLICY, None, "none", None, "auth_no_policy")),
    "none": (AUTHORISED, "p@plain.example", message("p@plain.example"),
             expect("none", PLAIN, None, "none", None, "none")),
    "fail": (UNAUTHORISED, "a@example.org", message("a@example.org"),
             expect("fail", ORG, None, "fail", "reject", "fail")),
    "dkim_broken_by_a_changed_body": (
        UNAUTHORISED, "a@example.org", signed(message("a@example.org")).replace(b"Hello", b"Jello"),
        expect("fail", ORG, "fail", "fail", "reject", "fail")),
    "temperror": (AUTHORISED, "t@slow.example", message("t@slow.example"),
                  expect("temperror", SLOW, None, "temperror", None, "temperror")),
}  # fmt: skip

EXPECTED_HEADER = {
    "aligned_pass": (
        "Authentication-Results: relay.example.com;\r\n\tspf=pass smtp.mailfrom=example.org;"
        "\r\n\tdkim=pass header.d=example.org;\r\n\tdmarc=pass (p=reject) header.from="
        "example.org;\r\n\tarc=none\r\n"
    ),
    "none": (
        "Authentication-Results: relay.example.com;\r\n\tspf=none smtp.mailfrom=plain.example;"
        "\r\n\tdkim=none;\r\n\tdmarc=none header.from=plain.example;\r\n\tarc=none\r\n"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_verdict_is_what_the_zone_implies(
    relay_env: MakeEnv, auth_dns: LoopbackDNS, case: str
) -> None:
    """The verdict in the received event and the spool record, and our header on top
    of both copies, are the zone's; the message is queued (never refused)."""
    source, sender, data, expected = CASES[case]
    env = await relay_env(auth_yaml(auth_dns))
    qid = await send_from(source, env.port, sender, ["alice@example.com"], data)
    [event] = env.events("received")
    assert event["auth"] == expected
    assert event["client_ip"] == source
    for name, copy in (await copies(env, qid)).items():
        header = copy.split(b"\r\n\r\n", 1)[0].decode()
        assert header.startswith("Authentication-Results: relay.example.com;\r\n"), name
        assert header.index("Authentication-Results:") < header.index("Received:")
        assert f"dmarc={expected['dmarc']}" in header
        if case in EXPECTED_HEADER:
            assert header.startswith(EXPECTED_HEADER[case] + "Received: from client.test")
        assert copy.endswith(data.split(b"\r\n\r\n", 1)[1]), "the body is the client's"


async def test_the_spool_record_holds_the_verdict_and_the_fields_to_add(
    relay_env: MakeEnv, auth_dns: LoopbackDNS
) -> None:
    env = await relay_env(auth_yaml(auth_dns))
    intake = env.relay.handler.intake
    stored: list[Any] = []
    queued = intake.on_queued
    assert queued is not None

    def spy(qid: str, record: Any) -> object:
        stored.append(env.relay.spool.load(qid).envelope)  # committed before on_queued
        return queued(qid, record)

    intake.on_queued = spy
    source, sender, data, expected = CASES["aligned_pass"]
    await send_from(source, env.port, sender, ["alice@example.com"], data)
    [envelope] = stored
    assert envelope.auth is not None and envelope.auth.to_dict() == expected
    assert envelope.prepended("legacy") == envelope.prepended("new")
    assert envelope.prepended("new").decode() == EXPECTED_HEADER["aligned_pass"]
    assert parse_envelope(envelope.to_json()) == envelope


async def test_a_dead_nameserver_never_delays_the_250_past_auth_timeout(
    relay_env: MakeEnv, auth_dns: LoopbackDNS
) -> None:
    """Every lookup of slow.example goes unanswered and dns.timeout (5 s) is longer
    than auth.timeout (1 s): the verdict is temperror and the 250 comes in ~1 s."""
    settings = auth_yaml(auth_dns, timeout=1)
    settings["dns"]["timeout"] = 5
    env = await relay_env(settings)
    started = time.monotonic()
    await send_from(AUTHORISED, env.port, "t@slow.example", ["alice@example.com"],
                    message("t@slow.example"))  # fmt: skip
    elapsed = time.monotonic() - started
    [event] = env.events("received")
    assert event["auth"]["class"] == "temperror"
    assert (event["auth"]["spf"], event["auth"]["dmarc"]) == ("temperror", "temperror")
    assert 0.9 < elapsed < 2.5, elapsed
    assert auth_dns.queries[("slow.example", "TXT")] >= 1  # asked, never answered


async def test_a_forged_authentication_results_of_our_id_is_removed(
    relay_env: MakeEnv, auth_dns: LoopbackDNS
) -> None:
    """RFC 8601 §5: an incoming field claiming our authserv-id (any case, with a
    comment or version) goes; another ADMD's stays; ours is on top."""
    forged = (
        b"Authentication-Results: (upstream) RELAY.example.com 1; spf=pass\r\n"
        b"\tsmtp.mailfrom=example.org; dmarc=pass header.from=example.org\r\n"
        b"Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=example.org\r\n"
    )
    env = await relay_env(auth_yaml(auth_dns))
    data = message("a@example.org", extra=forged)
    qid = await send_from(UNAUTHORISED, env.port, "a@example.org", ["alice@example.com"], data)
    for copy in (await copies(env, qid)).values():
        header = copy.split(b"\r\n\r\n", 1)[0]
        assert b"RELAY.example.com 1" not in header and b"(upstream)" not in header
        assert header.count(b"Authentication-Results:") == 2
        assert header.startswith(b"Authentication-Results: relay.example.com;\r\n\tspf=fail")
        assert b"Authentication-Results: mx.other.example; spf=pass" in header
    [event] = env.events("received")
    assert event["auth"]["class"] == "fail"  # the forgery changed nothing


@pytest.mark.parametrize("verify", [True, False])
async def test_without_our_header_the_copies_are_as_before(
    relay_env: MakeEnv, auth_dns: LoopbackDNS, verify: bool
) -> None:
    """auth.add_authentication_results false, or auth.verify false (then with no lookup
    and no verdict): the copies are the client's message behind our Received: and
    X-Relay-Trace: only, byte for byte, a field of our authserv-id included."""
    settings = auth_yaml(auth_dns, verify=verify, add_authentication_results=not verify)
    env = await relay_env(settings)
    data = message("a@example.org", extra=b"Authentication-Results: relay.example.com; x=y\r\n")
    qid = await send_from(AUTHORISED, env.port, "a@example.org", ["alice@example.com"], data)
    for copy in (await copies(env, qid)).values():
        assert copy.startswith(b"Received: from client.test ([127.0.0.2])")
        assert copy.endswith(f"X-Relay-Trace: test-node {qid}\r\n".encode() + data)
    [event] = env.events("received")
    if verify:
        assert event["auth"]["class"] == "aligned_pass"  # SPF pass, aligned
    else:
        assert "auth" not in event and sum(auth_dns.queries.values()) == 0


# ------------------------------------------------------------------------------ ARC

PERL_ARC = r"""
use strict;
use Mail::DKIM::ARC::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1, tcp_timeout => 5,
    udp_timeout => 5));
my $arc = Mail::DKIM::ARC::Verifier->new();
local $/;
my $msg = <STDIN>;
$arc->PRINT($msg);
$arc->CLOSE;
print $arc->result, "\n", $arc->result_detail, "\n";
"""


def perl_arc_verdict(server: LoopbackDNS, message_bytes: bytes) -> str:
    """Debian's Mail::DKIM::ARC::Verifier on `message_bytes`, keys from `server`."""
    import subprocess

    done = subprocess.run(
        ["perl", "-e", PERL_ARC, str(server.port)], input=message_bytes, capture_output=True,
        timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.decode()


def seal_yaml(server: LoopbackDNS, key_file: Path) -> dict[str, Any]:
    settings = auth_yaml(server)
    settings["auth"]["arc"] = {
        "seal": True, "providers": ["new"], "domain": "seal.example.com", "selector": "arc1",
        "key_file": str(key_file),
    }  # fmt: skip
    return settings


@pytest.mark.slow
async def test_the_arc_seal_verifies_in_an_independent_verifier(
    relay_env: MakeEnv, auth_dns: LoopbackDNS, tmp_path: Path
) -> None:
    """The new copy is sealed (cv=none, i=1) and Mail::DKIM's ARC verifier (Perl, no
    code shared with dkimpy) says pass; dkimpy agrees; legacy's copy is unsealed."""
    key_file = tmp_path / "arc.pem"
    key_file.write_bytes(key("seal.example.com").private)
    env = await relay_env(seal_yaml(auth_dns, key_file))
    data = signed(message("a@example.org"))
    qid = await send_from(AUTHORISED, env.port, "a@example.org", ["alice@example.com"], data)
    got = await copies(env, qid)
    assert b"ARC-Seal:" not in got["legacy"]
    new = got["new"]
    assert new.startswith(b"ARC-Seal: i=1;")
    assert b"cv=none" in new.split(b"ARC-Message-Signature:", 1)[0]
    assert b"ARC-Authentication-Results: i=1; relay.example.com;" in new
    verdict = perl_arc_verdict(auth_dns, new)
    assert verdict.splitlines()[0] == "pass", verdict
    cv, _, why = dkim.arc_verify(new, dnsfunc=_dnsfunc(auth_dns))
    assert cv == dkim.CV_Pass, why
    # and a relay after us validates the chain: arc=pass in its own verdict
    env2 = await relay_env(auth_yaml(auth_dns))
    body = new.split(b"\r\n\r\n", 1)[1]
    header = new.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    trimmed = re.sub(rb"(?m)^(Received|X-Relay-Trace):.*\r\n(\t.*\r\n)*", b"", header)
    await send_from(AUTHORISED, env2.port, "a@example.org", ["alice@example.com"],
                    trimmed + b"\r\n" + body)  # fmt: skip
    assert env2.events("received")[0]["auth"]["arc"] == "pass"


@pytest.mark.slow
def test_a_broken_seal_fails_in_the_independent_verifier(auth_dns: LoopbackDNS) -> None:
    """The Perl verifier is not a rubber stamp: a sealed message whose body changed fails."""
    sealed_bytes = _sealed(auth_dns)
    assert perl_arc_verdict(auth_dns, sealed_bytes).splitlines()[0] == "pass"
    assert perl_arc_verdict(auth_dns, sealed_bytes.replace(b"Hello", b"Jello")).startswith("fail")


def _sealed(auth_dns: LoopbackDNS) -> bytes:
    from relay.auth.arc import seal

    ar = b"Authentication-Results: relay.example.com; spf=pass smtp.mailfrom=example.org;\r\n"
    data = ar + b"\tarc=none\r\n" + message("a@example.org")
    return seal(data, "arc1", "seal.example.com", key("seal.example.com").private,
                "relay.example.com") + data  # fmt: skip


def _dnsfunc(server: LoopbackDNS) -> Callable[..., bytes | None]:
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port = ["127.0.0.1"], server.port

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            return b"".join(next(iter(r.resolve(name.decode(), "TXT"))).strings)
        except dns.resolver.NXDOMAIN:
            return None

    return txt


# ---------------------------------------------------------- metrics, check, auth-test


async def test_metrics_count_each_method_and_result(
    relay_env: MakeEnv, auth_dns: LoopbackDNS
) -> None:
    from tests.test_metrics import get

    env = await relay_env(auth_yaml(auth_dns))
    for name in ("aligned_pass", "fail", "none"):
        source, sender, data, _ = CASES[name]
        await send_from(source, env.port, sender, ["alice@example.com"], data)
    _, text = await get(env.relay.metrics_port, "/metrics")
    lines = set(text.splitlines())
    for method, result, n in [
        ("spf", "pass", 1), ("spf", "fail", 1), ("spf", "none", 1), ("dkim", "pass", 1),
        ("dkim", "none", 2),
        ("dmarc", "pass", 1), ("dmarc", "fail", 1), ("dmarc", "none", 1), ("arc", "none", 3),
        ("class", "aligned_pass", 1), ("class", "fail", 1), ("class", "none", 1),
    ]:  # fmt: skip
        assert f'relay_auth_results_total{{method="{method}",result="{result}"}} {n}.0' in lines


def write_cfg(folder: Path, settings: dict[str, Any]) -> Path:
    from tests.harness import relay_settings, write_relay

    return write_relay(folder, relay_settings(2601, 2602, settings))


def cli(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from relay.cli import cli as relay_cli

    res = CliRunner().invoke(relay_cli, list(args))
    return res.exit_code, res.output


def test_auth_test_judges_one_message_offline(auth_dns: LoopbackDNS, tmp_path: Path) -> None:
    """`relay auth-test`: the verifier of `relay serve` on one .eml (LF line ends as
    saved by a mail client), and the header it would add."""
    cfg = write_cfg(tmp_path / "config", auth_yaml(auth_dns, add_authentication_results=False))
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed(message("a@example.org")).replace(b"\r\n", b"\n"))
    args = ["auth-test", "-c", str(cfg), str(eml), "--client-ip", UNAUTHORISED]
    code, out = cli(*args, "--mail-from", "a@example.org", "--helo", "client.test")
    assert code == 0, out
    assert out.startswith("Authentication-Results: relay.test;\n\tspf=fail smtp.mailfrom=")
    assert "dkim=pass header.d=example.org;" in out and "dmarc=pass (p=reject)" in out
    assert out.endswith("# class: aligned_pass\n")
    code, out = cli(*args, "--mail-from", "<>", "--helo", "plain.example", "--json")
    assert code == 0, out
    verdict = json.loads(out)
    assert (verdict["spf"], verdict["spf_domain"], verdict["class"]) == (
        "none", "plain.example", "aligned_pass",
    )  # fmt: skip


def test_check_warns_when_no_resolver_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        settings = {
            "dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": 0.3},
            "auth": {"verify": True},
        }
        code, out = cli("check", "-c", str(write_cfg(tmp_path / "config", settings)))
    assert code == 0, out
    assert re.search(r"warning: .*relay.yaml:\d+: auth.verify: no DNS resolver answers", out), out


def test_check_validates_the_arc_settings(auth_dns: LoopbackDNS, tmp_path: Path) -> None:
    good = tmp_path / "arc.pem"
    good.write_bytes(key("seal.example.com").private)
    settings = seal_yaml(auth_dns, good)
    code, out = cli("check", "-c", str(write_cfg(tmp_path / "ok", settings)))
    assert code == 0 and "auth" not in out, out
    other = tmp_path / "other.pem"
    other.write_bytes(key("example.org").private)  # a real key, but not the published one
    code, out = cli("check", "-c", str(write_cfg(tmp_path / "other", seal_yaml(auth_dns, other))))
    assert code == 0, out
    assert "auth.arc.selector: arc1._domainkey.seal.example.com publishes another key" in out
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")
    code, out = cli("check", "-c", str(write_cfg(tmp_path / "bad", seal_yaml(auth_dns, bad))))
    assert code == 1 and re.search(r"relay.yaml:\d+: auth.arc.key_file: .*not an RSA", out), out
    broken = seal_yaml(auth_dns, tmp_path / "missing.pem")
    broken["auth"]["arc"] |= {"selector": "no good", "domain": None}
    broken["auth"]["add_authentication_results"] = False
    code, out = cli("check", "-c", str(write_cfg(tmp_path / "broken", broken)))
    assert code == 1, out
    for problem in (
        "auth.arc.seal: needs auth.verify and auth.add_authentication_results",
        "auth.arc.domain: needed with seal: true",
        "auth.arc.selector: 'no good' is not a DNS name",
        "auth.arc.key_file: ",
        "missing.pem: file not found",
    ):
        assert problem in out, out


async def test_a_message_over_max_dkim_size_is_judged_by_its_header_only(
    relay_env: MakeEnv, auth_dns: LoopbackDNS
) -> None:
    """Above auth.max_dkim_size the message is never read back whole: its signature is
    `temperror` (not verified), SPF and DMARC still decide, and it is queued as usual."""
    env = await relay_env(auth_yaml(auth_dns, max_dkim_size=4096))
    data = signed(message("a@example.org", body=b"x" * 70 + b"\r\n"))
    big = data + b"y" * 70 * 100 + b"\r\n"
    qid = await send_from(AUTHORISED, env.port, "a@example.org", ["alice@example.com"], big)
    [event] = env.events("received")
    assert event["auth"]["dkim"] == [{"domain": "example.org", "result": "temperror"}]
    assert (event["auth"]["spf"], event["auth"]["dmarc"]) == ("pass", "pass")
    assert event["auth"]["class"] == "aligned_pass"
    for copy in (await copies(env, qid)).values():
        assert copy.endswith(big.split(b"\r\n\r\n", 1)[1])
