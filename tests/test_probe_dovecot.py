"""The placement probe against a real IMAP server: Dovecot, started by the tests.

Two stand-in SMTP providers hand every message they accept to their own Dovecot
over LMTP; each Dovecot's Sieve script plays that provider's spam filter
(Inbox, Junk, another folder, or discard), keyed on a test header per provider.
The test decides each copy's fate itself, so its tally is computed
independently of Sieve, the probe and the report.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

from relay import config
from relay import dovecot as dovecot_mod
from relay.app import Relay
from relay.cli import cli
from relay.dovecot import PASSWORD, Dovecot
from relay.probe.daemon import Probe
from relay.report.logs import build_report
from relay.report.placement import attach_placement
from relay.testing import Provider
from tests.helpers_probe import PILOTS, events, message, probe_yaml, send_all, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realservers,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        dovecot_mod.available() is None,
        reason="dovecot is not installed (apt-get install dovecot-core dovecot-imapd "
        "dovecot-lmtpd dovecot-sieve)",
    ),
]

FOLDER_OF = {"inbox": "INBOX", "junk": "Junk", "other": "Promotions"}
SIEVE = """\
if header :is "X-Test-{side}" "junk" {{ fileinto "Junk"; stop; }}
if header :is "X-Test-{side}" "other" {{ fileinto "Promotions"; stop; }}
if header :is "X-Test-{side}" "discard" {{ discard; stop; }}
"""
USERS = ["ann@example.com", "ben@example.com", "cid@example.com", "dot@example.com"]
GROUP = {"ann": "sales", "ben": "sales", "cid": "support", "dot": "support"}


class Env:
    def __init__(self, folder: Path, relay: Relay, probe: Probe, stores: dict[str, Dovecot]):
        self.folder = folder
        self.relay = relay
        self.probe = probe
        self.stores = stores

    @property
    def placement_log(self) -> Path:
        return self.probe.settings.log

    def placements(self) -> list[dict[str, Any]]:
        return events(self.placement_log, "placement")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    stores = {
        side: Dovecot(SIEVE.format(side=side.title()), name=side, folders=("Promotions",))
        for side in ("legacy", "new")
    }
    providers = {side: Provider(side) for side in stores}
    try:
        for side, store in stores.items():
            store.start()
            store.attach(providers[side])
            await providers[side].start()
        os.environ["RELAY_TEST_IMAP_PASSWORD"] = PASSWORD
        probed = {
            side: f"{{host: 127.0.0.1, port: {store.imap_port}, tls: none, "
            "password_env: RELAY_TEST_IMAP_PASSWORD, timeout: 5}"
            for side, store in stores.items()
        }
        folder = tmp_path / "cfg"
        folder.mkdir()
        (folder / "pilot-users.yaml").write_text(PILOTS)
        path = folder / "relay.yaml"
        path.write_text(probe_yaml(providers["legacy"].port, providers["new"].port, probed))
        cfg = config.load(path)
        relay = Relay(cfg)
        await relay.start()
        probe = Probe(cfg)
        await probe.start()
        yield Env(folder, relay, probe, stores)
        await probe.stop()
        await relay.stop()
    finally:
        for p in providers.values():
            await p.stop()
        Dovecot.close_all(list(stores.values()))


def _plan(n: int, seed: int) -> list[tuple[str, dict[str, str], bool]]:
    """(rcpt, test headers, has Message-ID) per message: each provider's fate drawn here."""
    rng = random.Random(seed)
    fates = ["inbox"] * 5 + ["junk"] * 2 + ["other", "discard"]
    out = []
    for i in range(n):
        legacy, new = rng.choice(fates), rng.choice(fates)
        if i % 10 == 0:  # a sure divergence every tenth message: legacy Inbox, new Junk
            legacy, new = "inbox", "junk"
        out.append(
            (USERS[i % len(USERS)], {"X-Test-Legacy": legacy, "X-Test-New": new}, i % 7 != 3)
        )
    return out


async def test_probe_finds_every_copy_where_sieve_put_it(env: Env) -> None:
    plan = _plan(50, seed=15)
    items = [(rcpt, message(i, rcpt, hdrs, mid)) for i, (rcpt, hdrs, mid) in enumerate(plan)]
    qids = await send_all(env.relay.port, items)
    settings = env.probe.settings

    # The test's own tally: what each provider's filter does with each copy.
    want: dict[tuple[str, str], str] = {}
    for qid, (_, hdrs, _) in zip(qids, plan, strict=True):
        for side in ("legacy", "new"):
            fate = hdrs[f"X-Test-{side.title()}"]
            want[(qid, side)] = "missing" if fate == "discard" else fate
    await wait_until(lambda: len(env.placements()) == len(want), 30, "every copy settled")
    got = {(e["queue_id"], e["provider"]): e for e in env.placements()}
    assert {k: e["folder"] for k, e in got.items()} == want

    for (_qid, side), e in got.items():
        if e["folder"] == "missing":
            assert e["looked_after_s"] >= settings.give_up_after
            assert e["detail"] is None and e["match"] is None
        else:
            assert e["detail"] == FOLDER_OF[e["folder"]]
            assert e["looked_after_s"] < settings.give_up_after  # found at an earlier look
            assert e["match"] in ("message_id", "sweep") and e["provider_time"].endswith("Z")
        assert e["node"] == "node1" and e["group"] == GROUP[e["rcpt"].split("@")[0]]
        want_to = (
            e["rcpt"] if side == "legacy" else e["rcpt"].replace("example.com", "example-new.com")
        )
        assert e["delivered_to"] == want_to
    # messages sent without Message-ID were given one at ingress: found by it all the same
    received = {e["queue_id"]: e for e in events(env.relay.cfg.relay.log, "received")}
    no_id = [q for q, (_, _, mid) in zip(qids, plan, strict=True) if not mid]
    assert no_id and all(received[q]["message_id_added"] for q in no_id)

    # The report's placement figures equal the tally.
    report = build_report([env.relay.cfg.relay.log])
    attach_placement(report, [env.placement_log])
    placement = report.placement
    assert placement is not None
    for side in ("legacy", "new"):
        tally = Counter(f for (_, s), f in want.items() if s == side)
        stats = placement.providers[side]
        counts = (stats.probed, stats.inbox, stats.junk, stats.other, stats.missing, stats.unknown)
        assert counts == (50, tally["inbox"], tally["junk"], tally["other"], tally["missing"], 0)
        assert stats.junk_rate == round(tally["junk"] / 50, 4)
    expected_div = {
        qid for qid in qids
        if {want[(qid, "legacy")], want[(qid, "new")]} in ({"inbox", "junk"}, {"inbox", "missing"})
    }  # fmt: skip
    assert {d.queue_id for d in placement.divergences} == expected_div
    for d in placement.divergences:  # both sides shown
        assert {d.legacy.folder, d.new.folder} == {
            want[(d.queue_id, "legacy")],
            want[(d.queue_id, "new")],
        }
    groups = {g.name: g for g in placement.groups}
    for name in ("sales", "support"):
        users = [u for u in USERS if GROUP[u.split("@")[0]] == name]
        idx = [i for i, (r, _, _) in enumerate(plan) if r in users]
        for side in ("legacy", "new"):
            assert groups[name].providers[side].junk == sum(
                1 for i in idx if want[(qids[i], side)] == "junk"
            )

    # Read-only, header fields only, no flag set: from Dovecot's own transcript and log.
    for store in env.stores.values():
        transcripts = store.transcripts()
        assert transcripts
        for lines in transcripts.values():
            for line in lines.splitlines():
                command = line.split(" ", 2)[2] if line.count(" ") >= 2 else line
                verb = command.split(" ", 2)[:2]
                assert verb[0] in ("EXAMINE", "LIST", "LOGOUT", "UID", "CAPABILITY"), line
                if verb[0] == "UID":
                    assert verb[1] in ("SEARCH", "FETCH"), line
                if verb[:2] == ["UID", "FETCH"]:
                    items = command.split(" ", 3)[3]
                    assert re.fullmatch(
                        r"\(BODY\.PEEK\[HEADER\.FIELDS \([A-Z\- ]+\)\] INTERNALDATE\)", items
                    ), line
        sessions = re.findall(r"Disconnected: Logged out .*", store.log())
        assert sessions and all("body_count=0 body_bytes=0" in s for s in sessions)
        # maildir: a message no session took stays in new/; flags would follow ":2,"
        files = [p for p in (store.dir / "mail").rglob("*,S=*") if p.parent.name in ("new", "cur")]
        assert files and all(p.parent.name == "new" and ":2," not in p.name for p in files)


async def test_unknown_not_missing_while_the_mailbox_server_is_down(env: Env) -> None:
    env.stores["new"].stop()
    items = [(u, message(100 + i, u, {"X-Test-Legacy": "inbox", "X-Test-New": "inbox"}))
             for i, u in enumerate(USERS)]  # fmt: skip
    qids = await send_all(env.relay.port, items)
    await wait_until(lambda: len(env.placements()) == 2 * len(qids), 30, "every copy settled")
    got = {(e["queue_id"], e["provider"]): e for e in env.placements()}
    for qid in qids:
        assert got[(qid, "legacy")]["folder"] == "inbox"
        new = got[(qid, "new")]
        assert new["folder"] == "unknown" and "refused" in new["detail"].lower()
    assert env.probe.metrics.errors.labels("new", "connect")._value.get() > 0
    report = build_report([env.relay.cfg.relay.log])
    attach_placement(report, [env.placement_log])
    assert report.placement is not None
    assert report.placement.providers["new"].unknown == len(qids)
    assert report.placement.providers["new"].missing == 0
    assert report.placement.providers["new"].junk_rate is None  # no known result


async def test_probe_check_and_once(env: Env) -> None:
    items = [(u, message(200 + i, u, {"X-Test-Legacy": "junk", "X-Test-New": "inbox"}))
             for i, u in enumerate(USERS[:2])]  # fmt: skip
    qids = await send_all(env.relay.port, items)
    await wait_until(lambda: len(env.placements()) == 4, 30, "every copy settled")
    path = str(env.folder / "relay.yaml")
    res = CliRunner().invoke(cli, ["probe", "check", "-c", path])
    assert res.exit_code == 0, res.output
    assert [line.split(" ", 2)[:2] for line in res.output.splitlines()] == [
        ["legacy:", "ok"], ["new:", "ok"],
    ]  # fmt: skip
    assert "login ann@example.com (password), inbox INBOX, junk Junk (SPECIAL-USE)" in res.output
    before = len(env.placements())
    res = CliRunner().invoke(
        cli, ["probe", "once", "-c", path, "--since", "2000-01-01", "--user", "ann@example.com"]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"legacy ann@example.com node1 {qids[0]}: junk (Junk, by message_id)" in lines
    assert f"new ann@example-new.com node1 {qids[0]}: inbox (INBOX, by message_id)" in lines
    assert lines[-1] == "2 copies looked for, 0 mailbox error(s)"
    assert len(env.placements()) == before  # `once` prints; it writes no placement event


def test_tls_modes_implicit_and_starttls_verified_with_the_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    for p in (cert_file, key_file):
        p.chmod(0o644)
    store = Dovecot(name="tls", tls=(cert_file, key_file))
    try:
        store.start()
        folder = tmp_path / "cfg"
        folder.mkdir()
        (folder / "pilot-users.yaml").write_text(PILOTS)
        common = f"ca_file: {ca_file}, password_env: RELAY_TEST_IMAP_PASSWORD"
        providers = {
            "legacy": f"{{host: 127.0.0.1, port: {store.imaps_port}, tls: implicit, {common}}}",
            "new": f"{{host: 127.0.0.1, port: {store.imap_port}, tls: starttls, {common}}}",
        }
        (folder / "relay.yaml").write_text(probe_yaml(2601, 2602, providers))
        os.environ["RELAY_TEST_IMAP_PASSWORD"] = PASSWORD
        res = CliRunner().invoke(cli, ["probe", "check", "-c", str(folder / "relay.yaml")])
        assert res.exit_code == 0, res.output
        assert "tls implicit" in res.output and "tls starttls" in res.output
        logins = re.findall(r"imap-login: Info: Login: .*", store.log())
        assert len(logins) == 2 and all("TLS" in line for line in logins), logins
        # without the CA the certificate is not trusted: a tls error, exit 1
        (folder / "relay.yaml").write_text(
            probe_yaml(
                2601, 2602, {"legacy": providers["legacy"].replace(f"ca_file: {ca_file}, ", "")}
            )
        )
        res = CliRunner().invoke(cli, ["probe", "check", "-c", str(folder / "relay.yaml")])
        assert res.exit_code == 1 and "legacy: FAILED" in res.output and "tls: " in res.output
    finally:
        store.close()
