"""Delivering like an MTA (issue 14): several hosts, MX lookup, dead hosts, AUTH hold.

The relay runs in-process (as in test_delivery.py) against scripted loopback
providers on 127.0.0.x addresses (all loopback on Linux) and a real DNS
server on loopback (dnslib, UDP and TCP). Nothing depends on timing: dead
hosts stay dead for an hour, holds are passed with the fake clock.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay import config
from relay.delivery import Hosts
from relay.delivery.reply import Failed, Reply, remote_id
from relay.report.logs import build_report
from relay.resolver import Resolver
from relay.testing import Provider, Rule
from tests import test_delivery
from tests.conftest import write_config
from tests.helpers_dns import LoopbackDNS
from tests.test_delivery import SENDER, Env, Factory, copies, message, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared

pytestmark = pytest.mark.timeout(60)

ZONE = """
example-new.test.  300 IN MX 10 mx1.example-new.test.
example-new.test.  300 IN MX 20 mx2.example-new.test.
example-new.test.  300 IN MX 30 mx3.example-new.test.
mx1.example-new.test. 300 IN A 127.0.0.2
mx2.example-new.test. 300 IN A 127.0.0.3
mx3.example-new.test. 300 IN A 127.0.0.4
equal.test.        300 IN MX 10 a.equal.test.
equal.test.        300 IN MX 10 b.equal.test.
equal.test.        300 IN MX 20 c.equal.test.
a.equal.test.      300 IN A 127.0.0.2
b.equal.test.      300 IN A 127.0.0.3
c.equal.test.      300 IN A 127.0.0.4
dual.test.         300 IN A 127.0.0.2
dual.test.         300 IN AAAA ::1
tls-a.test.        300 IN A 127.0.0.2
tls-b.test.        300 IN A 127.0.0.3
nomx.test.         300 IN A 127.0.0.5
"""
ZONE += "".join(  # an answer over 512 octets: truncated on UDP, asked again over TCP
    f"big.test. 300 IN MX {i} host{i:02d}.a-rather-long-mail-exchanger-name.big.test.\n"
    for i in range(30)
)


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS(ZONE) as server:
        yield server


def dns_yaml(server: LoopbackDNS) -> dict[str, Any]:
    return {"dns": {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2}}


def resolver(server: LoopbackDNS) -> Resolver:
    return Resolver(config.DnsSettings(nameservers=("127.0.0.1",), port=server.port, timeout=2))


async def on(address: str, port: int, name: str, *rules: Rule, **kwargs: Any) -> Provider:
    """A provider listening on `address`:`port` (a port the first one picked)."""
    p = Provider(name, host=address, port=port, **kwargs)
    for rule in rules:
        p.add(rule)
    await p.start()
    return p


# ------------------------------------------------------------------- MX and dead hosts


async def test_mx_first_two_down_delivers_through_third_then_skips_them(
    make_env: Factory, dns: LoopbackDNS
) -> None:
    """SPEC acceptance: mx1 times out, mx2 refuses, mx3 takes the message; the next
    message goes straight to mx3 (dead_host_time is an hour: no timing involved)."""
    mx3 = Provider("mx3", host="127.0.0.4")
    await mx3.start()
    port = mx3.port
    mx1 = await on("127.0.0.2", port, "mx1", Rule("hang", stage="connect"))  # times out
    lookups = dns.queries[("example-new.test", "MX")]
    try:
        env = await make_env(
            new=mx3,
            new_cfg={
                "host": None,
                "mx": "example-new.test",
                "port": port,
                "dead_host_time": 3600,
                "connect_timeout": 1,
            },
            extra=dns_yaml(dns),
        )
        first = await env.send(["alice@example.com"])
        [e] = await env.wait_events(1, provider="new")
        assert (e["outcome"], e["attempt"]) == ("delivered", 1), e
        assert len(copies(mx3, first.marker)) == 1
        assert mx1.connections == 1
        mx2 = await on("127.0.0.3", port, "mx2")  # up now, but still dead for the relay
        try:
            second = await env.send(["alice@example.com"])
            [_, e] = await env.wait_events(2, provider="new")
            assert (e["outcome"], e["attempt"]) == ("delivered", 1), e
            assert len(copies(mx3, second.marker)) == 1
            assert mx1.connections == 1 and mx2.connections == 0  # both skipped
        finally:
            await mx2.stop()
        assert dns.queries[("example-new.test", "MX")] == lookups + 1  # cached for its TTL
    finally:
        await mx1.stop()


@pytest.mark.parametrize(
    ("rule", "dead"),
    [
        (Rule("defer", stage="connect"), False),  # 421 greeting
        (Rule("reject", stage="connect"), False),  # 554 greeting
        (Rule("reject", stage="ehlo"), False),  # 550 to EHLO and HELO
        (Rule("defer", stage="mail", code=421, text="4.3.2 Shutting down"), False),
        (Rule("hang", stage="connect"), True),  # no greeting: timed out
        (Rule("drop", stage="connect"), True),  # closed before the greeting
    ],
    ids=["421-greeting", "554-greeting", "550-ehlo", "421-mail", "timeout", "drop"],
)
async def test_next_host_in_the_list(make_env: Factory, rule: Rule, dead: bool) -> None:
    second = Provider("second", host="127.0.0.3")
    await second.start()
    first = await on("127.0.0.2", second.port, "first", rule)
    try:
        env = await make_env(
            new=second,
            new_cfg={
                "host": ["127.0.0.2", "[127.0.0.3]"],
                "connect_timeout": 1,
                "dead_host_time": 3600,
            },
        )
        for n in (1, 2):
            sent = await env.send(["alice@example.com"])
            events = await env.wait_events(n, provider="new")
            assert (events[-1]["outcome"], events[-1]["attempt"]) == ("delivered", 1)
            assert len(copies(second, sent.marker)) == 1
            await env.idle()
            await env.relay.scheduler.agent.close()  # a new connection for the next message
        # a host that failed to connect is skipped; one that answered is tried again
        assert first.connections == (1 if dead else 2)
        assert first.messages == []
    finally:
        await first.stop()


async def test_final_only_when_every_host_answers_5xx_at_the_greeting(
    make_env: Factory,
) -> None:
    b = Provider("b", host="127.0.0.3")
    b.add(Rule("reject", stage="connect", code=554, text="5.7.1 No thanks"))
    await b.start()
    a = await on("127.0.0.2", b.port, "a", Rule("reject", stage="connect"))
    try:
        env = await make_env(new=b, new_cfg={"host": ["127.0.0.2", "127.0.0.3"]})
        await env.send(["alice@example.com"])
        [e] = await env.wait_events(1, provider="new")
        assert (e["outcome"], e["smtp_code"], e["enhanced_code"]) == ("bounced", 554, "5.7.1")
        await a.stop()  # now one host refuses the connection, the other still says 554
        await env.send(["alice@example.com"])
        [_, e] = await env.wait_events(2, provider="new")
        assert (e["outcome"], e["smtp_code"]) == ("deferred", None), e
    finally:
        await a.stop()


async def test_a_and_aaaa_addresses_tried_in_turn(make_env: Factory, dns: LoopbackDNS) -> None:
    v6 = Provider("v6", host="::1")
    await v6.start()  # nothing on 127.0.0.2 at that port: the A address refuses
    env = await make_env(
        new=v6, new_cfg={"host": "dual.test", "dead_host_time": 3600}, extra=dns_yaml(dns)
    )
    sent = await env.send(["alice@example.com"])
    [e] = await env.wait_events(1, provider="new")
    assert e["outcome"] == "delivered", e
    assert len(copies(v6, sent.marker)) == 1


def tls_for(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


async def test_tls_required_failure_goes_to_the_next_host(
    make_env: Factory, dns: LoopbackDNS, ca: trustme.CA, tmp_path: Path
) -> None:
    """tls-a offers no STARTTLS; tls-b does, with a certificate for its name (not
    its address): verified against the host name."""
    b = Provider("b", host="127.0.0.3", starttls=True, tls_context=tls_for(ca, "tls-b.test"))
    await b.start()
    a = await on("127.0.0.2", b.port, "a")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        env = await make_env(
            new=b,
            new_cfg={
                "host": ["tls-a.test", "tls-b.test"],
                "tls": "required",
                "ca_file": str(ca_file),
            },
            extra=dns_yaml(dns),
        )
        sent = await env.send(["alice@example.com"])
        [e] = await env.wait_events(1, provider="new")
        assert e["outcome"] == "delivered" and e["tls"], e
        [m] = copies(b, sent.marker)
        assert m.tls
        assert a.messages == [] and a.connections == 1
    finally:
        await a.stop()


async def test_tls_policy_failure_is_logged_as_the_relays(make_env: Factory) -> None:
    env = await make_env(new_cfg={"tls": "required"})  # the provider offers no STARTTLS
    await env.send(["alice@example.com"])
    [e] = await env.wait_events(1, provider="new")
    assert (e["outcome"], e["smtp_code"], e["by"]) == ("deferred", None, "relay")
    [legacy] = await env.wait_events(1, provider="legacy")
    assert "by" not in legacy  # the providers' own replies carry no "by"


async def test_equal_preferences_shuffled_lower_first(dns: LoopbackDNS) -> None:
    hosts = Hosts(resolver(dns), rng=random.Random(1))
    cfg = config.ProviderSettings(mx="equal.test")
    orders = set()
    for _ in range(40):
        route, skipped = await hosts.route(cfg)
        orders.add(tuple(h.name for h in route))
        assert skipped == 0
    assert orders == {
        ("a.equal.test", "b.equal.test", "c.equal.test"),
        ("b.equal.test", "a.equal.test", "c.equal.test"),
    }


async def test_mx_lookup_details(dns: LoopbackDNS) -> None:
    hosts = Hosts(resolver(dns))
    # no MX records: the domain itself is the host (RFC 5321 §5.1)
    route, _ = await hosts.route(config.ProviderSettings(mx="nomx.test"))
    assert [(h.name, h.address) for h in route] == [("nomx.test", "127.0.0.5")]
    # a long answer comes over TCP after a truncated UDP one
    lookups = dns.queries[("big.test", "MX")]
    records = await resolver(dns).mx("big.test")
    assert len(records) == 30
    assert dns.queries[("big.test", "MX")] == lookups + 2  # UDP (truncated), then TCP
    # every host dead: all are tried rather than none
    cfg = config.ProviderSettings(mx="example-new.test", dead_host_time=3600)
    route, _ = await hosts.route(cfg)
    for h in route:
        hosts.failed(cfg, h)
    again, skipped = await hosts.route(cfg)
    assert again == route and skipped == 0
    hosts.connected(cfg, route[2])
    assert [h.name for h in (await hosts.route(cfg))[0]] == ["mx3.example-new.test"]


async def test_no_host_or_no_dns_defers(make_env: Factory, dns: LoopbackDNS) -> None:
    env = await make_env(new_cfg={"host": None, "mx": "unknown.test"}, extra=dns_yaml(dns))
    await env.send(["alice@example.com"])
    [e] = await env.wait_events(1, provider="new")
    assert (e["outcome"], e["smtp_code"]) == ("deferred", None)  # NXDOMAIN: no host at all
    assert "no address" in e["smtp_response"]
    silent = LoopbackDNS("")  # a port where no DNS server answers
    silent.start()
    silent.stop()
    settings = config.DnsSettings(nameservers=("127.0.0.1",), port=silent.port, timeout=0.5)
    with pytest.raises(Failed) as failed:
        await Hosts(Resolver(settings)).route(config.ProviderSettings(mx="example-new.test"))
    assert failed.value.reply.code is None and "DNS lookup of MX" in failed.value.reply.text


def test_host_and_mx_settings() -> None:
    assert config.ProviderSettings(host="[smtp.example.com]").hosts == ("smtp.example.com",)
    p = config.ProviderSettings(host=["a.example.com", "[b.example.com]"])
    assert p.hosts == ("a.example.com", "b.example.com") and p.nexthop == "a.example.com"
    assert config.ProviderSettings(mx="example.com").nexthop == "example.com"
    with pytest.raises(ValueError, match="set host or mx, not both"):
        config.ProviderSettings(host="a.example.com", mx="example.com")
    with pytest.raises(ValueError, match="at least one host"):
        config.ProviderSettings(host=[])


def test_mx_of_an_own_domain_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "domains: [example.com]\nproviders:\n  new:\n    mx: Example.COM\n"
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value).endswith(
        "relay.yaml:4: providers.new.mx: Example.COM is in domains: "
        "its MX is this relay (a mail loop)"
    )


# ---------------------------------------------------------------------- AUTH failure hold

PASSWORD = "the-right-one"


async def send_many(env: Env, n: int, rcpt: str = "zed@example.com") -> None:
    """`n` messages over one session."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=env.relay.port,
        start_tls=False,
        timeout=30,
        local_hostname="client.test",
    )
    async with smtp:
        for _ in range(n):
            errors, _ = await smtp.sendmail(SENDER, [rcpt], message(env.marker()))
            assert errors == {}


async def test_one_failed_login_per_hold_not_per_message(
    make_env: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1,000 messages queued at a provider whose password is wrong: one failed
    login per `auth_failure_hold`, not one per message (nor per connection)."""
    monkeypatch.setenv("RELAY_TEST_PW", "wrong")
    root = tmp_path / "relay"
    # 1. queue 1,000 messages (each tried once, and deferred by a greylisting provider)
    grey = Provider("legacy")
    grey.add(Rule("defer", stage="mail", code=451, text="4.7.1 Greylisted"))
    env = await make_env(legacy=grey, root=root)
    await send_many(env, 1000)
    tried = env.relay.scheduler.messages.values
    await until(lambda: all(d.attempts for m in tried() for d in m.deliveries), 30, "1,000 tried")
    await env.idle()
    await env.relay.stop()
    await grey.stop()
    # 2. restarted with those 1,000 due at once, and a wrong password
    legacy = Provider("legacy", auth={"relayuser": PASSWORD})
    env = await make_env(
        legacy=legacy,
        root=root,
        clock=env.clock,
        legacy_cfg={
            "username": "relayuser",
            "password_env": "RELAY_TEST_PW",
            "auth_failure_hold": 300,
        },
    )
    assert len(env.relay.scheduler.messages) == 1000
    env.clock.advance(400)  # past every retry: all 1,000 due now
    for hold in (1, 2, 3):
        await legacy.wait_until(lambda h=hold: len(legacy.auth_attempts) >= h, what="a login")
        await env.idle()  # the probe is recorded
        assert len(legacy.auth_attempts) == hold  # one login per hold
        assert len(env.events(provider="legacy")) == 1000 + hold  # one deferral per hold
        env.clock.advance(299)  # still held: nothing is tried
        await env.idle()
        assert len(legacy.auth_attempts) == hold
        if hold < 3:
            env.clock.advance(2)  # the hold is over: one more login
    # 3. the password fixed: after the hold (and the probes' own backoff), once a
    # login works, everything goes
    monkeypatch.setenv("RELAY_TEST_PW", PASSWORD)
    env.clock.advance(400)
    await legacy.wait_for_messages(1000, timeout=60)
    await env.idle()
    assert len(env.events(provider="legacy", outcome="delivered")) == 1000
    assert len(legacy.auth_attempts) - 3 <= 4  # one per connection (max_connections 4)
    assert env.bounce.messages == []


# ------------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("2.0.0 Ok: queued as 4WxYz15cKJz9vR", "4WxYz15cKJz9vR"),  # Postfix
        ("OK id=1tWxyz-000abc-De", "1tWxyz-000abc-De"),  # Exim
        (
            "2.0.0 OK  1717171717 d9443c01a7336-1f3a2b3c4d5si123456ad.123 - gsmtp",
            "d9443c01a7336-1f3a2b3c4d5si123456ad.123",
        ),  # Gmail
        (
            "2.6.0 <CAF=k9Xq3rT@mail.example.org> [InternalId=21397163114817, "
            "Hostname=AM0PR02MB5860.eurprd02.prod.outlook.com] 12345 bytes in 0.123, "
            "98.038 KB/sec Queued mail for delivery",
            "CAF=k9Xq3rT@mail.example.org",
        ),  # Microsoft 365
        (
            "2.6.0 [InternalId=21397163114817, Hostname=AM0PR02MB5860.eurprd02.prod.outlook"
            ".com] Queued mail for delivery",
            "21397163114817",
        ),  # Microsoft 365 without a Message-ID in the reply
        ("2.0.0 4B2Hq8Lk012345 Message accepted for delivery", "4B2Hq8Lk012345"),  # Sendmail
        ("2.0.0 0100018f2c3d4e5f-1a2b3c4d-000000", "0100018f2c3d4e5f-1a2b3c4d-000000"),  # bare
        ("Ok 0100018f2c3d4e5f-000000", "0100018f2c3d4e5f-000000"),  # Amazon SES
        ("2.0.0 Ok", None),
        ("OK", None),
        ("2.0.0 Message accepted", None),
    ],
)
def test_remote_id_from_every_common_reply_form(reply: str, expected: str | None) -> None:
    assert remote_id(reply) == expected


def test_too_many_recipients_forms() -> None:
    assert Reply.from_smtp(452, "4.5.3 Too many recipients", "rcpt").too_many_recipients
    assert Reply.from_smtp(452, "too many recipients", "rcpt").too_many_recipients  # Exim
    assert not Reply.from_smtp(452, "4.2.2 Mailbox full", "rcpt").too_many_recipients
    assert not Reply.from_smtp(452, "Insufficient system storage", "rcpt").too_many_recipients
    assert not Reply.from_smtp(451, "too many recipients", "rcpt").too_many_recipients


async def test_bare_452_too_many_recipients_goes_at_once(make_env: Factory) -> None:
    legacy = Provider("legacy")
    legacy.add(Rule("defer", rcpt="r3@example.com", code=452, text="too many recipients", times=1))
    env = await make_env(legacy=legacy)
    sent = await env.send(["r1@example.com", "r2@example.com", "r3@example.com"])
    events = await env.wait_events(4, provider="legacy")  # no clock advance needed
    assert (events[-1]["rcpt"], events[-1]["outcome"], events[-1]["attempt"]) == (
        "r3@example.com",
        "delivered",
        2,
    )
    got = copies(env.legacy, sent.marker)
    assert [m.rcpts for m in got] == [["r1@example.com", "r2@example.com"], ["r3@example.com"]]


async def test_report_charges_a_relay_made_refusal_to_the_relay(make_env: Factory) -> None:
    env = await make_env(new=Provider("new", smtputf8=False))
    await env.send(["alice@example.com"], sender="jörg@example.org", options=["SMTPUTF8"])
    await env.wait_events(1, provider="new", outcome="bounced")
    await env.wait_events(1, provider="legacy", outcome="delivered")
    rep = build_report([str(env.log_path)])
    rejections = rep.providers["new"].rejections
    assert rejections["relay"] == 1 and sum(rejections.values()) == 1
    [d] = rep.divergences
    assert (d.refused_by, d.new.reason, d.new.enhanced_code) == ("new", "relay", "5.6.7")
