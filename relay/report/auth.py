"""The report's authentication figures (SPEC Part 2 "Judging fairly").

**By authentication**: every provider figure again, for the pairs of each
class the relay gave the message at ingress (`received` events' `auth.class`).

**Fairness**: of the copies the relay judged `aligned_pass`, how often each
provider's own verdict (the `verdict` tokens of its placement events) said
spf, dmarc or compauth fail (softfail counted as fail). Mail that passes DMARC
at the relay and fails it at the provider is the mark of a provider that judges
the relay's IP instead of the original sender's: not set up to trust the relay
as its inbound gateway. Without placement logs the table cannot exist, and the
report says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from relay.records import AUTH_CLASSES
from relay.report.inputs import read_events
from relay.report.model import FAIRNESS_ALERT_RATE, AuthFairness, FairnessRow

PROVIDERS = ("legacy", "new")
FAIRNESS_TOKENS = ("spf", "dmarc", "compauth")
FAILING = frozenset({"fail", "softfail"})
NO_PLACEMENT = "no placement log given (--placement): the providers' own verdicts are unknown"
NO_VERDICTS = "no received event carries a verdict (auth.verify was off)"


def auth_class(ev: Mapping[str, Any]) -> str | None:
    """The class a `received` event gives its message; None without a (valid) verdict."""
    auth = ev.get("auth")
    cls = auth.get("class") if isinstance(auth, dict) else None
    return cls if cls in AUTH_CLASSES else None


def _token(value: Any) -> str:
    """A verdict token's result word: "fail (reason)" and "Fail" read as "fail"."""
    return str(value).strip().split(" ", 1)[0].split("(", 1)[0].lower() if value else ""


class Fairness:
    """Tallies aligned_pass pairs against the providers' placement verdicts."""

    def __init__(self, placement: Iterable[str | os.PathLike[str]] = ()) -> None:
        paths = [os.fspath(p) for p in placement]
        self.given = bool(paths)
        self.errors: list[str] = []
        # (node, queue id, rcpt lowercased, provider) -> the last verdict seen
        self.verdicts: dict[tuple[str, str, str, str], dict[str, str]] = {}
        try:
            for ev in read_events(paths):
                if ev.get("event") == "placement":
                    self._placement(ev)
        except (OSError, EOFError, ValueError) as exc:
            self.errors.append(f"placement log: {exc}")
        self.seen = dict.fromkeys(PROVIDERS, 0)
        self.fails = {p: dict.fromkeys(FAIRNESS_TOKENS, 0) for p in PROVIDERS}
        self.any_fail = dict.fromkeys(PROVIDERS, 0)
        self.classes_seen = False

    def _placement(self, ev: dict[str, Any]) -> None:
        key = (ev.get("node"), ev.get("queue_id"), ev.get("rcpt"), ev.get("provider"))
        verdict = ev.get("verdict")
        if not all(isinstance(k, str) for k in key) or not isinstance(verdict, dict):
            return
        node, qid, rcpt, provider = (str(k) for k in key)
        self.verdicts[(node, qid, rcpt.lower(), provider)] = {
            t: _token(verdict.get(t)) for t in FAIRNESS_TOKENS if t in verdict
        }

    def pair(self, node: str, queue_id: str, rcpt: str, cls: str | None) -> None:
        if cls is None:
            return
        self.classes_seen = True
        if cls != "aligned_pass":
            return
        for p in PROVIDERS:
            verdict = self.verdicts.get((node, queue_id, rcpt.lower(), p))
            if verdict is None:
                continue
            self.seen[p] += 1
            failed = [t for t, v in verdict.items() if v in FAILING]
            for t in failed:
                self.fails[p][t] += 1
            self.any_fail[p] += bool(failed)

    def table(self) -> AuthFairness:
        if not self.classes_seen:
            return AuthFairness(absent=NO_VERDICTS)
        if not self.given:
            return AuthFairness(absent=NO_PLACEMENT)
        rows = []
        for p in PROVIDERS:
            n, bad = self.seen[p], self.any_fail[p]
            rate = bad / n if n else None
            note = None
            if rate is not None and rate >= FAIRNESS_ALERT_RATE:
                worst = max(FAIRNESS_TOKENS, key=lambda t: self.fails[p][t])
                note = (
                    f"{p} said {worst}=fail on {self.fails[p][worst] / n:.0%} of the mail the "
                    f"relay judged aligned_pass: it is probably not set up to trust the relay "
                    f"as its inbound gateway, so its spam figures are biased against the relay "
                    f"(README: inbound gateway settings)."
                )
            rows.append(FairnessRow(p, n, dict(self.fails[p]), bad, rate, note))
        return AuthFairness(rows)
