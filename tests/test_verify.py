"""Recipient verification (SPEC Part 2 "Recipient verification (no backscatter)"):
`recipients: FILE` and `verify_recipients: true`, against loopback providers that
record every command they were sent (so each probe is counted). Cache ages are
passed with the fake clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay import config
from relay.testing import Provider, Rule
from relay.verify.cache import NEGATIVE_REFRESH, POSITIVE_EXPIRE, Answer, VerifyCache
from relay.verify.listed import listed
from tests import test_delivery
from tests.harness import RawClient
from tests.test_delivery import SENDER, Env, Factory, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared

pytestmark = pytest.mark.timeout(30)

RECIPIENTS = """\
# the valid users
alice@example.com
Bob@Example.com      # case does not matter
*@dev.example.com
"""


async def client(env: Env) -> RawClient:
    c = await RawClient.open(env.relay.port)
    await c.ehlo()
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert r.code == 250, r
    return c


async def rcpt(c: RawClient, address: str) -> tuple[int, str | None]:
    r = await c.cmd(f"RCPT TO:<{address}>")
    return r.code, r.enhanced


def probes(p: Provider, address: str) -> int:
    return sum(1 for c in p.commands if c.lower() == f"rcpt to:<{address}>".lower())


# ------------------------------------------------------------------- recipients file


def test_recipients_file_syntax_and_matching(tmp_path: Path) -> None:
    relay = config.RelaySettings()
    path = tmp_path / "r.txt"
    path.write_text(RECIPIENTS)
    table = config.load_recipients(path, "r.txt", relay)
    for address in ("alice@example.com", "ALICE@EXAMPLE.COM", "bob@example.com",
                    "alice+tag@example.com", "anyone@dev.example.com"):  # fmt: skip
        assert listed(table, address, "+"), address
    for address in ("zed@example.com", "alice+tag@example.com.evil", "a@sub.dev.example.com"):
        assert not listed(table, address, "+"), address
    assert not listed(table, "alice+tag@example.com", "")  # no delimiter: no subaddresses
    path.write_text("alice@example.com\nnot an address\nzed@elsewhere.test\n")
    with pytest.raises(config.ConfigError) as err:
        config.load_recipients(path, "r.txt", relay)
    assert [str(i) for i in err.value.issues] == [
        "r.txt:2: not an address: 'not an address'",
        "r.txt:3: domain elsewhere.test is not in domains",
    ]


async def with_recipients(make_env: Factory, tmp_path: Path, text: str = RECIPIENTS) -> Env:
    root = tmp_path / "relay-r"
    (root / "config").mkdir(parents=True)
    (root / "config" / "recipients.txt").write_text(text)
    return await make_env(root=root, extra={"recipients": "recipients.txt"})


async def test_unlisted_address_in_domains_gets_550_user_unknown(
    make_env: Factory, tmp_path: Path
) -> None:
    env = await with_recipients(make_env, tmp_path)
    c = await client(env)
    assert await rcpt(c, "alice@example.com") == (250, "2.1.5")
    assert await rcpt(c, "alice+news@example.com") == (250, "2.1.5")
    assert await rcpt(c, "BOB@example.com") == (250, "2.1.5")
    assert await rcpt(c, "ann@dev.example.com") == (250, "2.1.5")
    assert await rcpt(c, "postmaster@example.com") == (250, "2.1.5")  # RFC 5321 §4.5.1
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    assert await rcpt(c, "zed@elsewhere.test") == (550, "5.7.1")  # the relay check first
    await c.close()
    [event] = [e for e in env.events("rejected") if e.get("rcpt") == "zed@example.com"]
    assert (event["smtp_code"], event["enhanced_code"], event["reason"]) == (
        550, "5.1.1", "unknown user",
    )  # fmt: skip


async def test_recipients_file_is_reloaded_and_a_bad_edit_refused(
    make_env: Factory, tmp_path: Path
) -> None:
    env = await with_recipients(make_env, tmp_path)
    path = env.root / "config" / "recipients.txt"
    await asyncio.sleep(0.3)  # let the watcher settle on the directory
    path.write_text(RECIPIENTS + "zed@example.com\n")

    async def answer(address: str) -> tuple[int, str | None]:
        c = await client(env)
        try:
            return await rcpt(c, address)
        finally:
            await c.close()

    await until(lambda: env.relay.recipients.known("zed@example.com"), 5, "reload")  # type: ignore[union-attr]
    assert await answer("zed@example.com") == (250, "2.1.5")
    path.write_text("zed@example.com\nbroken line\n")
    await until(lambda: env.relay.recipients.refused >= 1, 5, "refusal")  # type: ignore[union-attr]
    env.relay.reload()  # and SIGHUP does the same
    assert await answer("alice@example.com") == (250, "2.1.5")  # the last good list stays


# -------------------------------------------------------------------- verification


async def verifying(make_env: Factory, **kwargs: object) -> Env:
    legacy = Provider("legacy")
    legacy.add(Rule("reject", rcpt="zed@example.com", code=550, text="5.1.1 No such user"))
    legacy.add(Rule("defer", rcpt="later@example.com", code=450, text="4.2.1 Try later"))
    legacy.add(Rule("hang", rcpt="slow@example.com"))
    return await make_env(
        legacy=legacy, extra={"verify_recipients": True, "verify_timeout": 1}, **kwargs
    )


async def test_unknown_users_are_refused_at_rcpt_and_never_bounced(make_env: Factory) -> None:
    """The acceptance: 550 at RCPT, no DSN afterwards; a repeat is answered from the
    cache (the provider saw exactly one probe), and the probes share one connection."""
    env = await verifying(make_env)
    c = await client(env)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    assert await rcpt(c, "yann@example.com") == (250, "2.1.5")
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    r = await c.cmd("DATA")
    assert r.code == 354
    await c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    await env.wait_events(1, outcome="delivered")
    await env.idle()
    assert probes(env.legacy, "zed@example.com") == 1
    assert probes(env.legacy, "yann@example.com") == 2  # the probe and the delivery
    assert env.relay.verifier.probes == 2  # type: ignore[union-attr]
    probe_commands = [c for c in env.legacy.commands if c.startswith(("MAIL", "RCPT", "RSET"))]
    assert probe_commands[:3] == ["MAIL FROM:<>", "RCPT TO:<zed@example.com>", "RSET"]
    delivered = [m for m in env.legacy.messages if m.mail_from == SENDER]
    assert [m.rcpts for m in delivered] == [["yann@example.com"]]
    assert env.events("delivery", rcpt="zed@example.com") == []
    assert env.bounce.messages == [] and env.events("bounce_sent") == []
    # both probes went over the verifier's one connection (the delivery made its own)
    assert env.legacy.connections == 2


async def test_transient_answers_are_pending_and_not_cached(make_env: Factory) -> None:
    env = await verifying(make_env)
    c = await client(env)
    assert await rcpt(c, "later@example.com") == (450, "4.1.1")
    assert await rcpt(c, "later@example.com") == (450, "4.1.1")
    assert probes(env.legacy, "later@example.com") == 2  # a 4xx is asked again
    assert await rcpt(c, "slow@example.com") == (450, "4.1.1")  # no answer within 1 s
    await c.close()
    [event] = [e for e in env.events("rejected") if e.get("rcpt") == "slow@example.com"]
    assert event["reason"] == "verification pending: no answer in time"


async def test_pilots_are_verified_at_their_primary_only(make_env: Factory) -> None:
    env = await verifying(make_env)
    c = await client(env)
    assert await rcpt(c, "alice@example.com") == (250, "2.1.5")  # dual: legacy is primary
    assert await rcpt(c, "bob@example.com") == (250, "2.1.5")  # new-only, as robert@
    await c.close()
    assert probes(env.legacy, "alice@example.com") == 1
    assert probes(env.new, "alice@example-new.com") == 0
    assert probes(env.new, "robert@example-new.com") == 1
    assert probes(env.legacy, "bob@example.com") == 0


async def test_the_cache_survives_a_restart(make_env: Factory, tmp_path: Path) -> None:
    root = tmp_path / "relay-v"
    env = await verifying(make_env, root=root)
    c = await client(env)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    await c.close()
    await env.relay.stop()
    assert (root / "var" / "spool" / "verify.cache").exists()
    again = await make_env(
        legacy=env.legacy, new=env.new, root=root, clock=env.clock,
        extra={"verify_recipients": True, "verify_timeout": 1},
    )  # fmt: skip
    c = await client(again)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    await c.close()
    assert probes(env.legacy, "zed@example.com") == 1
    assert again.relay.verifier.probes == 0  # type: ignore[union-attr]


async def test_a_negative_answer_is_refreshed_after_three_hours(make_env: Factory) -> None:
    """Postfix's verify(8): the cached answer stands while a background probe asks again."""
    env = await verifying(make_env)
    c = await client(env)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    env.legacy.clear()  # zed exists now
    env.clock.advance(NEGATIVE_REFRESH - 60)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")
    assert probes(env.legacy, "zed@example.com") == 1  # not yet due
    env.clock.advance(120)
    assert await rcpt(c, "zed@example.com") == (550, "5.1.1")  # the old answer, meanwhile
    await env.legacy.wait_until(lambda: probes(env.legacy, "zed@example.com") == 2)
    verifier = env.relay.verifier
    assert verifier is not None
    await until(lambda: not verifier._running, 5, "the refresh")
    assert await rcpt(c, "zed@example.com") == (250, "2.1.5")
    await c.close()


def test_cache_ages_and_compaction(tmp_path: Path) -> None:
    path = tmp_path / "verify.cache"
    cache = VerifyCache(path)
    cache.load(0)
    cache.put(("legacy", "a@example.com"), Answer(True, "250 ok", 0))
    cache.put(("legacy", "z@example.com"), Answer(False, "550 no", 0))
    cache.put(("legacy", "a@example.com"), Answer(True, "250 ok", 10))  # a refresh
    cache.close()
    with path.open("a") as fh:
        fh.write('{"p": "legacy", "a": "torn')
    later = VerifyCache(path)
    later.load(5 * 86400)  # the negative answer (3 days) expired, the positive not
    assert later.get(("legacy", "a@example.com"), 5 * 86400) == Answer(True, "250 ok", 10)
    assert later.get(("legacy", "z@example.com"), 5 * 86400) is None
    assert len(path.read_text().splitlines()) == 1  # compacted
    assert later.get(("legacy", "a@example.com"), POSITIVE_EXPIRE + 10) is None


async def test_probes_keep_to_the_auth_hold(
    make_env: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password: the first probe's failed login holds the account, and the
    next RCPTs get 450 without another login (a provider locks an account after a few)."""
    monkeypatch.setenv("RELAY_TEST_VERIFY_PASSWORD", "wrong")
    legacy = Provider("legacy", auth={"relayuser": "right"})
    env = await make_env(
        legacy=legacy,
        legacy_cfg={"username": "relayuser", "password_env": "RELAY_TEST_VERIFY_PASSWORD"},
        extra={"verify_recipients": True, "verify_timeout": 5},
    )
    c = await client(env)
    for address in ("yann@example.com", "yann@example.com", "zoe@example.com"):
        assert await rcpt(c, address) == (450, "4.1.1")
    await c.close()
    assert len(legacy.auth_attempts) == 1
