"""A month of realistic pilot traffic on two nodes, and what the test decided happened.

`make_month` writes the delivery logs a relay would (a `config` header per file
with the provider labels, a rotated gzip file on one node) and returns `Month`:
every (message, recipient) pair with both sides' fate. The tests compute the
expected figures from `Month.pairs`, never from the report.

Groups: sales (dual, divergences below the threshold), marketing (dual, above
it), support (dual users, one cut-over user whose new-primary mail bounces on
DMARC, one paused user), dev (a few pairs: insufficient data), non-pilot mail,
some forwarded copies and messages still pending at the end of the logs.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

LABELS = {"legacy": "Zoho Mail", "new": "Microsoft 365"}
START = datetime(2026, 11, 2, 7, 0, tzinfo=UTC)
DAYS = 28


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# (kind of user, group, address); kinds: dual, cutover (new-only), paused (legacy-only)
PILOTS = [
    ("dual", "sales", "alice.martin@example.com"),
    ("dual", "sales", "amir.haddad@example.com"),
    ("dual", "sales", "sam.okafor@example.com"),
    ("dual", "sales", "sofia.rossi@example.com"),
    ("dual", "marketing", "carol.nguyen@example.com"),
    ("dual", "marketing", "mark.jensen@example.com"),
    ("dual", "marketing", "maya.cohen@example.com"),
    ("dual", "support", "sue.tanaka@example.com"),
    ("dual", "support", "sven.larsen@example.com"),
    ("cutover", "support", "bob.durand@example.com"),
    ("paused", "support", "dave.kowalski@example.com"),
    ("dual", "dev", "dina@dev.example.com"),
]
NON_PILOTS = [f"user{i:03d}@example.com" for i in range(60)]
# How many messages each pilot receives over the month, and its new provider's refusal rate.
TRAFFIC = {"sales": (260, 0.0015), "marketing": (220, 0.03), "support": (200, 0.002),
           "dev": (4, 0.0)}  # fmt: skip
CUTOVER_REFUSAL = 0.04
LEGACY_REFUSAL = 0.002

# Replies, as the providers send them (tests/test_report_reasons.py has more).
NEW_REFUSALS = [  # (code, enhanced, text, reason class)
    (550, "5.7.1", "550 5.7.1 Service unavailable, Client host [203.0.113.{n}] blocked using "
     "Spamhaus. To request removal from this list see https://www.spamhaus.org/query/ip/"
     "203.0.113.{n} (AS16012611)", "spam_content"),
    (550, "5.4.1", "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) "
     "[DB5EUR03FT0{n}.eop-EUR03.prod.protection.outlook.com]", "unknown_user"),
    (550, "5.7.509", "550 5.7.509 Access denied, sending domain [news{n}.example.org] does not "
     "pass DMARC verification and has a DMARC policy of reject.", "auth_policy"),
]  # fmt: skip
CUTOVER_REFUSALS = [
    (550, "5.7.26", "550 5.7.26 This mail is unauthenticated, which poses a security risk to "
     "the sender and users, and has been blocked. <{rcpt}> [AM{n}PR04.prod.outlook.com]",
     "auth_policy"),
]  # fmt: skip
LEGACY_REFUSALS = [
    (550, "5.1.1", "550 5.1.1 <{rcpt}> User unknown", "unknown_user"),
]
NEW_DEFERRAL = (451, "4.7.500", "451 4.7.500 Server busy. Please try again later from "
                "[203.0.113.7]. (AS77712344) [AM0PR04.prod.protection.outlook.com]")  # fmt: skip
LEGACY_DEFERRAL = (452, "4.3.1", "452 4.3.1 Temporary System Error")


@dataclass
class Side:
    """One provider's planned delivery of a pair and how it ended."""

    outcome: str  # delivered | bounced | expired | pending
    final_ts: str | None = None
    latency_ms: int | None = None
    attempt: int = 1
    deferrals: int = 0
    reply: str = ""
    reason: str | None = None
    template: int | None = None  # index of the refusal reply in its list


@dataclass
class Pair:
    node: str
    queue_id: str
    received: str
    rcpt: str
    message_id: str
    group: str  # "(non-pilot)" for non-pilots
    shape: str  # dual | forwarded | cutover | paused | nonpilot
    legacy: Side | None
    new: Side | None

    @property
    def pilot(self) -> bool:
        return self.shape != "nonpilot"


@dataclass
class Month:
    paths: list[Path]
    pairs: list[Pair] = field(default_factory=list)

    def pilot_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.pilot]


def _plan_entry(rcpt: str, provider: str, role: str, group: str | None, mode: str | None,
                pilot: bool) -> dict[str, Any]:  # fmt: skip
    to = rcpt if provider == "legacy" else rcpt.replace("example.com", "example-new.com")
    return {"rcpt": rcpt, "provider": provider, "delivered_to": to, "role": role,
            "group": group, "mode": mode, "pilot": pilot}  # fmt: skip


class _Node:
    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.seq = 0

    def add(self, at: datetime, **ev: Any) -> None:
        self.seq += 1
        self.events.append((stamp(at), self.seq, {"event": ev.pop("event"), "ts": stamp(at),
                                                  "node": self.name, **ev}))  # fmt: skip

    def lines(self) -> list[str]:
        return [json.dumps(ev) for _, _, ev in sorted(self.events)]


def _header(node: str, at: datetime, reason: str) -> str:
    return json.dumps({
        "event": "config", "ts": stamp(at), "node": node, "reason": reason, "version": "0.1.0",
        "providers": {p: {"label": label} for p, label in LABELS.items()}, "log_privacy": "plain",
    })  # fmt: skip


def _fate(rng: random.Random, refusal: float, pending: bool) -> str:
    if pending:
        return "pending"
    r = rng.random()
    if r < refusal:
        return "bounced" if rng.random() < 0.8 else "expired"
    return "delivered"


def _side(
    rng: random.Random,
    node: _Node,
    pair: Pair,
    entry: dict[str, Any],
    received: datetime,
    fate: str,
    refusals: list[tuple[int, str, str, str]],
) -> Side:
    provider = entry["provider"]
    side = Side(fate)
    t = received
    deferral = NEW_DEFERRAL if provider == "new" else LEGACY_DEFERRAL
    n_def = 1 if rng.random() < 0.08 else 0
    if fate in ("expired", "pending"):
        n_def += 1
    for _ in range(n_def):
        t += timedelta(seconds=rng.uniform(1, 3) if side.attempt == 1 else 300)
        code, enh, text = deferral
        node.add(t, event="delivery", queue_id=pair.queue_id, **entry, outcome="deferred",
                 smtp_code=code, enhanced_code=enh, smtp_response=text, attempt=side.attempt,
                 latency_ms=int((t - received) / timedelta(milliseconds=1)), tls="TLSv1.3",
                 remote_id=None)  # fmt: skip
        side.attempt += 1
        side.deferrals += 1
    if fate == "pending":
        side.attempt -= 1
        return side
    t += timedelta(milliseconds=rng.randint(300, 4000) if provider == "legacy" else
                   rng.randint(500, 6000))  # fmt: skip
    if fate == "expired":
        t += timedelta(days=5)
    latency = int((t - received) / timedelta(milliseconds=1))
    if fate == "delivered":
        code, enh = 250, "2.0.0"
        if provider == "new":  # Microsoft 365 quotes the Message-ID in its 250
            text = (
                f"250 2.6.0 {pair.message_id} [InternalId={rng.randrange(10**12)}, "
                "Hostname=AM0PR04MB1234.eurprd04.prod.outlook.com] Queued mail for delivery"
            )
        else:
            text = f"250 Message received {pair.queue_id.lower()}"
    elif fate == "expired":
        code, enh, text = 421, "4.4.2", "421 4.4.2 Connection timed out"
        side.reason = "other"
    else:
        side.template = rng.randrange(len(refusals))
        code, enh, template, side.reason = refusals[side.template]
        text = template.format(n=rng.randrange(10, 99), rcpt=entry["delivered_to"])
    node.add(t, event="delivery", queue_id=pair.queue_id, **entry, outcome=fate, smtp_code=code,
             enhanced_code=enh, smtp_response=text, attempt=side.attempt, latency_ms=latency,
             tls="TLSv1.3", remote_id=pair.queue_id if fate == "delivered" else None)  # fmt: skip
    if fate != "delivered" and entry["role"] == "primary":
        node.add(t + timedelta(milliseconds=5), event="bounce_sent", queue_id=pair.queue_id,
                 rcpt=pair.rcpt, dsn_queue_id=pair.queue_id + "D")  # fmt: skip
    side.final_ts, side.latency_ms, side.reply = stamp(t), latency, text
    return side


def make_month(folder: Path, seed: int = 17) -> Month:
    """Write the logs of two nodes into `folder`; mx1's is rotated into a .1.gz and the rest."""
    rng = random.Random(seed)
    nodes = [_Node("mx1"), _Node("mx2")]
    month = Month(paths=[])
    end = START + timedelta(days=DAYS)
    pending_after = end - timedelta(hours=2)  # the log ends while these are in flight
    deliveries: list[tuple[datetime, str, str, str]] = []  # (time, kind, group, rcpt)
    for kind, group, rcpt in PILOTS:
        n = TRAFFIC[group][0] if kind == "dual" else 90
        deliveries += [(START + timedelta(seconds=rng.uniform(0, DAYS * 86400)), kind, group, rcpt)
                       for _ in range(n)]  # fmt: skip
    for _ in range(30):  # forwarded copies of sales mail (the MX stayed at legacy for these)
        deliveries.append((START + timedelta(seconds=rng.uniform(0, DAYS * 86400)), "forwarded",
                           "sales", "alice.martin@example.com"))  # fmt: skip
    for _ in range(2400):
        deliveries.append((START + timedelta(seconds=rng.uniform(0, DAYS * 86400)), "nonpilot",
                           "(non-pilot)", rng.choice(NON_PILOTS)))  # fmt: skip
    deliveries.sort()
    for i, (at, kind, group, rcpt) in enumerate(deliveries):
        node = nodes[i % 2]
        qid = f"{i + 1:08X}{node.name[-1]}"
        mid = f"<{qid.lower()}.{i}@mail.sender{i % 7}.example.org>"
        pilot = kind != "nonpilot"
        mode = {"dual": "dual", "forwarded": "dual", "cutover": "new-only",
                "paused": "legacy-only"}.get(kind)  # fmt: skip
        g = group if pilot else None
        if kind == "dual":
            plan = [_plan_entry(rcpt, "legacy", "primary", g, mode, True),
                    _plan_entry(rcpt, "new", "shadow", g, mode, True)]  # fmt: skip
        elif kind == "forwarded":
            plan = [_plan_entry(rcpt, "new", "shadow", g, mode, True)]
        elif kind == "cutover":
            plan = [_plan_entry(rcpt, "new", "primary", g, mode, True)]
        else:
            plan = [_plan_entry(rcpt, "legacy", "primary", g, mode, pilot)]
        node.add(at, event="received", queue_id=qid, message_id=mid,
                 mail_from=f"news{i % 5}@sender.example.org", client_ip="203.0.113.25",
                 size=rng.randrange(2000, 90000), rcpts=[rcpt], plan=plan,
                 forwarded=kind == "forwarded")  # fmt: skip
        pair = Pair(node.name, qid, stamp(at), rcpt, mid, group, kind if pilot else "nonpilot",
                    None, None)  # fmt: skip
        pending = at > pending_after and rng.random() < 0.5
        for entry in plan:
            if entry["provider"] == "legacy":
                fate = _fate(rng, LEGACY_REFUSAL if pilot else 0.01, pending)
                pair.legacy = _side(rng, node, pair, entry, at, fate, LEGACY_REFUSALS)
            else:
                cut = kind == "cutover"
                refusal = CUTOVER_REFUSAL if cut else TRAFFIC[group][1]
                fate = _fate(rng, refusal, pending)
                refusals = CUTOVER_REFUSALS if cut else NEW_REFUSALS
                pair.new = _side(rng, node, pair, entry, at, fate, refusals)
        month.pairs.append(pair)
    mx1, mx2 = (n.lines() for n in nodes)
    half = len(mx1) // 2
    old = folder / "mx1" / "deliveries.jsonl.1.gz"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(gzip.compress(("\n".join([_header("mx1", START, "start"), *mx1[:half]])
                                   + "\n").encode()))  # fmt: skip
    cur = folder / "mx1" / "deliveries.jsonl"
    rotated_at = datetime.fromisoformat(json.loads(mx1[half])["ts"])
    cur.write_text("\n".join([_header("mx1", rotated_at, "reopen"), *mx1[half:]]) + "\n")
    other = folder / "mx2" / "deliveries.jsonl"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("\n".join([_header("mx2", START, "start"), *mx2]) + "\n")
    month.paths = [old, cur, other]
    return month
