"""Canaries (SPEC Part 2 "Canaries"): the sender inside `relay serve` and `relay check`."""

from __future__ import annotations

import email
import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import dkim
import pytest

from relay import config
from relay.canary import CANARY_HEADER
from relay.canary.sender import CanarySender, route_issues
from relay.report.canaries import canary_report
from relay.report.html import render_html
from relay.report.logs import build_report
from relay.report.placement import attach_placement
from relay.report.text import render_text
from tests.harness import PILOTS, RelayEnv, relay_settings, write_relay
from tests.helpers_auth import key

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


async def test_report_keeps_canaries_out_of_pilot_figures_and_shows_them_apart(
    relay_env: Callable[..., Awaitable[RelayEnv]], tmp_path: Path
) -> None:
    env = await relay_env(canary_yaml(tmp_path), pilots=CANARY_PILOTS)
    sender = CanarySender(env.cfg.relay.canary, env.port, env.relay.log.node)
    await sender.send_one()
    await sender.send_one()
    await env.send(["alice@example.com"])
    await env.wait_idle()
    deliveries = {(e["queue_id"], e["provider"]): e for e in env.events("delivery")}
    canary_qids = sorted({q for (q, _), e in deliveries.items() if e["group"] == "(canary)"})
    placements = tmp_path / "placement.jsonl"
    found = [("legacy", "inbox", 30.5), ("new", "junk", 90)]  # the second canary: not found
    lines = []
    for provider, folder, after in found:
        d = deliveries[(canary_qids[0], provider)]
        t250 = datetime.fromisoformat(d["ts"])
        lines.append({
            "event": "placement", "ts": (t250 + timedelta(seconds=120)).isoformat(),
            "node": d["node"], "queue_id": canary_qids[0], "rcpt": d["rcpt"],
            "provider": provider, "delivered_to": d["delivered_to"], "group": "(canary)",
            "folder": folder, "detail": folder, "match": "message_id",
            "provider_time": (t250 + timedelta(seconds=after)).isoformat(),
            "looked_after_s": 120, "verdict": None, "received": d["ts"], "canary": True,
        })  # fmt: skip
    placements.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = build_report([env.log_path], placement=[placements])
    attach_placement(rep, [placements])
    rep.canaries = canary_report([str(env.log_path)], [str(placements)])
    assert rep.comparison.pilot_pairs == 1  # alice only
    assert "(canary)" not in {g.name for g in rep.groups} | {v.group for v in rep.verdicts}
    assert rep.placement is not None and rep.placement.providers["legacy"].probed == 0
    doc = rep.to_dict()["canaries"]
    assert doc["legacy"] == {
        "sent": 2, "arrived": 1, "inbox": 1, "junk": 0, "other": 0, "missing": 1,
        "arrival_p50_s": 30.5, "arrival_p95_s": 30.5, "arrival_max_s": 30.5,
    }  # fmt: skip
    assert (doc["new"]["junk"], doc["new"]["arrival_max_s"]) == (1, 90)
    text = render_text(rep)
    assert "Canaries (messages the relay sent itself" in text
    assert "legacy 2 1 1 0 0 1 30.5 s / 30.5 s / 30.5 s" in " ".join(text.split())
    page = render_html(rep)
    assert page.index('id="canaries"') > page.index('id="authentication"')  # after the tables
    rows = re.findall(r"<tr><td class=\"p-(\w+)\">.*?</tr>", page.split('id="canary-table"')[1])
    cells = re.findall(r'<td class="num">([^<]*)</td>', page.split('id="canary-table"')[1])
    assert rows[:2] == ["legacy", "new"]
    assert cells[:9] == ["2", "1", "1", "0", "0", "1", "30.5 s", "30.5 s", "30.5 s"]
    assert cells[9:18] == ["2", "1", "0", "1", "0", "1", "90 s", "90 s", "90 s"]


def test_relay_check_refuses_unrouted_canary_mailboxes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from relay.cli import cli

    path = write_relay(tmp_path / "config", relay_settings(1, 2, canary_yaml(tmp_path)), PILOTS)
    r = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert r.exit_code == 1
    assert "canary.mailboxes.legacy: not a pilot entry of group (canary)" in r.output
    ok = write_relay(tmp_path / "ok", relay_settings(1, 2, canary_yaml(tmp_path)), CANARY_PILOTS)
    assert CliRunner().invoke(cli, ["check", "-c", str(ok)]).exit_code == 0
