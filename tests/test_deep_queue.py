"""A deep queue (a provider down for hours): messages between attempts are held in
short form, a restart recovers the queue in the background while accepting mail,
and the backlog drains beside fresh mail. The figures at scale are bench/outage.py's."""

from __future__ import annotations

import json
import zlib

import pytest

from relay import app as app_module
from relay.spool import FOOTER, MAGIC
from relay.testing import Provider, Rule
from tests import test_delivery
from tests.test_delivery import Factory, until

make_env = test_delivery.make_env  # the relay-in-process fixture, shared


async def test_deferred_messages_are_held_in_short_form_and_sent_whole(
    make_env: Factory,
) -> None:
    new = Provider("new")
    new.add(Rule("defer", stage="mail", code=451, text="4.3.2 Try later", times=3))
    env = await make_env(new=new)
    sent = [await env.send(["alice@example.com"]) for _ in range(3)]
    await env.wait_events(3, provider="new", outcome="deferred")
    await env.idle()
    held = env.relay.scheduler.messages
    assert set(held) == {s.queue_id for s in sent}
    for msg in held.values():  # nothing but the spool holds their envelopes now
        assert msg.envelope is None and all(d.plan is None for d in msg.deliveries)
        # nor the legacy copy's final delivery: only what is still open is held
        assert [(d.provider, d.status) for d in msg.deliveries] == [("new", "deferred")]
    env.clock.advance(100)  # past the first retry (60 s, jittered): read back, sent whole
    await env.wait_events(3, provider="new", outcome="delivered")
    for s in sent:
        [copy] = test_delivery.copies(env.new, s.marker)
        test_delivery.assert_faithful(copy, s)
        assert copy.rcpts == ["alice@example-new.com"]


async def test_a_deep_queue_is_recovered_while_mail_is_accepted(
    make_env: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past RECOVER_BEFORE_LISTENING records the relay listens first and recovers
    the rest in the background: a message sent at once gets its 250 and is
    delivered; every recovered message is delivered too, each exactly once."""
    legacy = Provider("legacy")
    legacy.add(Rule("defer", stage="mail", code=451, text="4.3.2 down"))
    env = await make_env(legacy=legacy)
    root = env.root
    queued = [await env.send(["zed@example.com"]) for _ in range(30)]
    await env.wait_events(30, provider="legacy", outcome="deferred")
    await env.idle()
    await env.relay.stop()
    legacy.rules.clear()
    monkeypatch.setattr(app_module, "RECOVER_BEFORE_LISTENING", 4)
    monkeypatch.setattr(app_module, "RECOVERY_BATCH", 2)
    env = await make_env(legacy=legacy, root=root, clock=env.clock)
    assert len(env.relay.scheduler.messages) == 4  # listening: the rest is on its way
    fresh = await env.send(["zed@example.com"])  # accepted with the recovery under way
    env.clock.advance(100)
    await until(lambda: len(env.relay.scheduler.messages) == 0, 20, "backlog drained")
    for s in [*queued, fresh]:
        assert len(test_delivery.copies(env.legacy, s.marker)) == 1, s.queue_id
    assert len(env.events(outcome="delivered")) == 31


async def test_an_envelope_unusable_past_its_outline_goes_to_corrupt_at_its_attempt(
    make_env: Factory,
) -> None:
    """A restart reads only the outline; an envelope whose checksum holds but whose
    fields do not (a sender that is not text) is found at its next attempt: moved to
    corrupt/, never sent, and the other message still delivered."""
    legacy = Provider("legacy")
    legacy.add(Rule("defer", stage="mail", code=451, text="4.3.2 down"))
    env = await make_env(legacy=legacy)
    bad = await env.send(["zed@example.com"])
    good = await env.send(["zed@example.com"])
    await env.wait_events(2, provider="legacy", outcome="deferred")
    await env.idle()
    await env.relay.stop()
    spool = env.relay.spool
    path = spool.msg_path(bad.queue_id)
    raw = path.read_bytes()
    _, clen, elen, ccrc, _ = FOOTER.unpack(raw[-FOOTER.size :])
    record = json.loads(raw[clen : clen + elen])
    record["mail_from"] = 42  # outline intact: version, arrival, plan
    env_bytes = json.dumps(record).encode()
    footer = FOOTER.pack(MAGIC, clen, len(env_bytes), ccrc, zlib.crc32(env_bytes))
    path.write_bytes(raw[:clen] + env_bytes + footer)
    legacy.rules.clear()
    env = await make_env(legacy=legacy, root=env.root, clock=env.clock)
    assert set(env.relay.scheduler.messages) == {bad.queue_id, good.queue_id}
    env.clock.advance(100)
    await until(lambda: not env.relay.scheduler.messages, 20, "queue emptied")
    assert (env.relay.spool.corrupt / f"{bad.queue_id}.msg").exists()
    assert test_delivery.copies(env.legacy, bad.marker) == []
    assert len(test_delivery.copies(env.legacy, good.marker)) == 1


async def test_a_restart_holds_only_the_open_deliveries_and_resends_nothing_final(
    make_env: Factory,
) -> None:
    """Recovered in short form, a pilot message whose legacy copy was delivered holds
    its `new` delivery alone; once `new` is back it is delivered there once, legacy
    gets no second copy, and the message leaves the spool."""
    new = Provider("new")
    new.add(Rule("defer", stage="mail", code=451, text="4.3.2 down"))
    env = await make_env(new=new)
    root = env.root
    sent = [await env.send(["alice@example.com"]) for _ in range(3)]
    await env.wait_events(3, provider="new", outcome="deferred")
    await env.wait_events(3, provider="legacy", outcome="delivered")
    await env.idle()
    await env.relay.stop()
    new.rules.clear()
    env = await make_env(legacy=env.legacy, new=new, root=root, clock=env.clock)
    held = env.relay.scheduler.messages
    assert set(held) == {s.queue_id for s in sent}
    for msg in held.values():
        assert [(d.index, d.provider, d.status) for d in msg.deliveries] == [(1, "new", "deferred")]
    env.clock.advance(100)
    await env.wait_events(3, provider="new", outcome="delivered")
    await until(lambda: not env.relay.scheduler.messages, 10, "the messages leave the queue")
    for s in sent:
        assert len(test_delivery.copies(env.new, s.marker)) == 1
        assert len(test_delivery.copies(env.legacy, s.marker)) == 1  # the first run's, only
    assert not list(env.relay.spool.queue_ids())
