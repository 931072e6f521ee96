"""Canaries (SPEC Part 2 "Canaries"): the sender inside `relay serve` and `relay check`."""

from __future__ import annotations

import email
from collections.abc import Awaitable, Callable
from pathlib import Path

import dkim
import pytest

from relay import config
from relay.canary import CANARY_HEADER
from relay.canary.sender import CanarySender, route_issues
from tests.harness import PILOTS, RelayEnv, relay_settings, write_relay
from tests.helpers_auth import key
from tests.test_probe import Env, new_address
from tests.test_probe import env as probe_env  # noqa: F401 (a fixture)

CANARY_PILOTS = PILOTS + (
    "  - address: canary@example.com\n"
    '    group: "(canary)"\n'
    "    new_address: canary@example-new.com\n"
)


def canary_yaml(folder: Path, every: float = 900) -> str:
    (folder / "canary.pem").parent.mkdir(parents=True, exist_ok=True)
    (folder / "canary.pem").write_bytes(key("canary.example.org").private)
    return f"""
    canary:
      enabled: true
      every: {every}
      dkim: {{domain: canary.example.org, selector: c1, key_file: {folder / "canary.pem"}}}
    """


def dns(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"c1._domainkey.canary.example.org."
    return key("canary.example.org").record.encode()


async def test_canaries_reach_both_providers_signed_and_rotated(
    relay_env: Callable[..., Awaitable[RelayEnv]], tmp_path: Path
) -> None:
    env = await relay_env(canary_yaml(tmp_path), pilots=CANARY_PILOTS)
    assert env.legacy and env.new
    sender = CanarySender(env.cfg.relay.canary, env.port, env.relay.log.node)
    ids = [await sender.send_one() for _ in range(3)]
    await env.legacy.wait_for_messages(3)
    await env.new.wait_for_messages(3)
    assert [m.rcpts for m in env.new.messages] == [["canary@example-new.com"]] * 3
    assert [m.rcpts for m in env.legacy.messages] == [["canary@example.com"]] * 3
    kinds = []
    for provider in (env.legacy, env.new):
        for m, cid in zip(provider.messages, ids, strict=True):
            assert dkim.verify(m.data, dnsfunc=dns), "DKIM signature does not verify"
            msg = email.message_from_bytes(m.data)
            assert msg[CANARY_HEADER] == cid
            assert msg["Message-ID"] == f"<canary.{cid}@canary.example.org>"
            attached = any(p.get_filename() == "canary.txt" for p in msg.walk())
            link = b"https://canary.example.org/canary/" in m.data
            kinds.append("attachment" if attached else "link" if link else "plain")
    assert kinds == ["plain", "link", "attachment"] * 2
    assert len(set(ids)) == 3


async def test_relay_serve_sends_a_canary_every_interval(
    relay_env: Callable[..., Awaitable[RelayEnv]], tmp_path: Path
) -> None:
    env = await relay_env(canary_yaml(tmp_path, every=0.2), pilots=CANARY_PILOTS)
    assert env.legacy and env.new
    await env.new.wait_for_messages(2)
    assert all(CANARY_HEADER.encode() in m.data for m in env.new.messages)


@pytest.mark.parametrize(
    ("pilots", "problem"),
    [
        (PILOTS, "canary.mailboxes.legacy: not a pilot entry of group (canary)"),
        (
            PILOTS + '  - address: canary@example.com\n    group: "(canary)"\n',
            "",  # new_domains maps example.com to example-new.com: the right new mailbox
        ),
        (
            PILOTS
            + '  - address: canary@example.com\n    group: "(canary)"\n'
            + "    new_address: other@example-new.com\n",
            "canary.mailboxes.new: the pilot entry routes to other@example-new.com at new",
        ),
    ],
)
def test_check_wants_the_canary_mailboxes_routed(tmp_path: Path, pilots: str, problem: str) -> None:
    folder = tmp_path / "config"
    settings = relay_settings(1, 2, canary_yaml(tmp_path))
    cfg = config.load(write_relay(folder, settings, pilots))
    found = [str(i) for i in route_issues(cfg)]
    if problem:
        assert len(found) == 1 and problem in found[0], found
    else:
        assert found == []


async def test_probe_measures_a_canary_and_counts_a_junked_one(probe_env: Env) -> None:
    env = probe_env
    probe = await env.start()
    rcpt = "ann@example.com"
    plan = [
        {"rcpt": rcpt, "provider": side, "delivered_to": to, "role": role,
         "group": "(canary)", "mode": "dual", "pilot": True}
        for side, to, role in (("legacy", rcpt, "primary"), ("new", new_address(rcpt), "shadow"))
    ]  # fmt: skip
    env.log.write(event="received", queue_id="C1", rcpts=[rcpt], plan=plan,
                  message_id="<C1@origin.test>")  # fmt: skip
    for d in plan:
        env.log.write(event="delivery", queue_id="C1", rcpt=rcpt, provider=d["provider"],
                      delivered_to=d["delivered_to"], group="(canary)", pilot=True,
                      outcome="delivered")  # fmt: skip
    await env.advance(30)
    env.file("legacy", rcpt, "INBOX", "C1")  # INTERNALDATE 30 s after the 250
    env.file("new", rcpt, "Junk", "C1")
    await env.advance(30)
    by = {e["provider"]: e for e in env.placements()}
    assert by["legacy"]["folder"] == "inbox" and by["legacy"]["canary"] is True
    assert by["new"]["folder"] == "junk" and by["new"]["canary"] is True
    m = probe.metrics
    assert m.canary_placements.labels("new", "junk")._value.get() == 1
    assert m.canary_roundtrip.labels("legacy")._sum.get() == 30
    assert m.canary_last_inbox.labels("legacy")._value.get() == env.clock.now()
    assert m.placements.labels("legacy", "inbox")._value.get() == 0  # not a pilot figure
