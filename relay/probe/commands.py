"""What `relay probe check` and `relay probe once` do, apart from their arguments."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay import config as config_mod
from relay.probe.config import ProbeProvider
from relay.probe.errors import ProbeError
from relay.probe.imap import ImapSession
from relay.probe.state import Look, ProbeState
from relay.probe.tokens import token_source
from relay.report.inputs import open_log, order_inputs
from relay.routing import PilotTable, route


def _session(settings: ProbeProvider, login: str) -> ImapSession:
    tokens = token_source(settings.oauth) if settings.auth == "xoauth2" else None
    return ImapSession(settings, login, tokens)


def sample_login(cfg: config_mod.Config, provider: str, settings: ProbeProvider) -> str | None:
    """A mailbox to try the settings on: the first pilot (not a wildcard) routed to `provider`."""
    table = PilotTable.build(cfg.pilots, cfg.relay)
    now = datetime.now(UTC)
    for e in cfg.pilots.pilots:
        if e.address.startswith("*@") or not e.probe:
            continue
        for d in route(e.address, table, now).deliveries:
            if d.provider == provider:
                return settings.login_for(d.delivered_to)
    return None


def check_provider(name: str, settings: ProbeProvider, login: str) -> str:
    """Log in, resolve the folders; one line saying what was found (raises ProbeError)."""
    with _session(settings, login) as s:
        f = s.folders()
    junk = ", ".join(f.junk) or "none found"
    return (
        f"{name}: ok {settings.host}:{settings.port} tls {settings.tls}, login {login} "
        f"({settings.auth}), inbox {f.inbox}, junk {junk} ({f.junk_source}), "
        f"{len(f.other)} other folder(s)"
    )


def once(
    cfg: config_mod.Config, since: datetime, user: str | None, echo: Callable[[str], None]
) -> int:
    """One look, now, for every probed copy delivered since `since`; prints each; errors count."""
    placement = cfg.relay.placement
    wide = placement.model_copy(update={"give_up_after": float("inf"), "sample": 1.0})
    canary = cfg.relay.canary.model_copy(update={"timeout": float("inf")})
    relay = cfg.relay.model_copy(update={"canary": canary})
    table = PilotTable.build(cfg.pilots, cfg.relay)
    state = ProbeState(wide, relay, lambda: table, lambda: datetime.now(UTC).timestamp())
    log = cfg.relay.log
    for path in order_inputs(p for p in log.parent.glob(log.name + "*") if p.suffix != ".state"):
        with open_log(path) as f:
            for raw in f:
                try:
                    state.ingest(_json(raw))
                except ValueError:
                    continue
    wanted_user = user.lower() if user else None
    looks = [
        lk for lk in state.looks.values()
        if lk.delivered >= since.timestamp() and not lk.pending
        and (wanted_user is None or wanted_user in (lk.rcpt.lower(), lk.delivered_to.lower()))
    ]  # fmt: skip
    errors = 0
    for name, settings in placement.providers.items():
        by_login: dict[str, list[Look]] = {}
        for lk in looks:
            if lk.provider == name:
                by_login.setdefault(settings.login_for(lk.delivered_to), []).append(lk)
        for login, group in sorted(by_login.items()):
            try:
                with _session(settings, login) as s:
                    found = s.find([lk.wanted() for lk in group])
            except ProbeError as exc:
                errors += 1
                echo(f"{name} {login}: error: {exc}")
                continue
            for lk in sorted(group, key=lambda x: x.delivered):
                hit = found.get(lk.key)
                where = f"{hit.folder} ({hit.name}, by {hit.match})" if hit else "not found"
                echo(f"{name} {lk.delivered_to} {lk.node} {lk.queue_id}: {where}")
    echo(f"{len(looks)} copies looked for, {errors} mailbox error(s)")
    return errors


def _json(raw: bytes) -> dict[str, Any]:
    ev = json.loads(raw)
    if not isinstance(ev, dict):
        raise ValueError("not an object")
    return ev
