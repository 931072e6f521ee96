"""The `relay` command line: parse arguments, call one module, set the exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import BinaryIO, Literal, NoReturn, TypeVar

import click

from relay import config as config_mod
from relay.privacy import Pseudonymizer, PseudonymKeyMissing
from relay.probe.cli import probe_group
from relay.report.command import report_command
from relay.routing import PilotTable, resolve_recipient, route

T = TypeVar("T")


def _or_exit(load: Callable[[str], T], path: str) -> T:
    """Run a config loader; on errors print one `PATH:LINE: KEY: message` each and exit 1."""
    try:
        return load(path)
    except config_mod.ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(1)


def _load(path: str, warn: bool = False) -> config_mod.Config:
    cfg = _or_exit(config_mod.load, path)
    for w in cfg.warnings if warn else ():
        click.echo(f"warning: {w}", err=True)
    return cfg


def parse_time(value: str) -> datetime:
    """RFC 3339 or a plain date (midnight UTC); a time without offset is UTC."""
    text = value.strip().replace("z", "Z")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not RFC 3339 or a date") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


DEFAULT_CONFIG = "/etc/relay/relay.yaml"

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    envvar="RELAY_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="relay.yaml (default: $RELAY_CONFIG, else /etc/relay/relay.yaml)",
)


@click.group()
@click.version_option(package_name="dual-relay", prog_name="relay", message="%(prog)s %(version)s")
def cli() -> None:
    """Dual-delivery SMTP relay for a mail-provider migration pilot."""


@cli.command()
@config_option
def check(config_path: str) -> None:
    """Validate both YAML files and print the routing table."""
    from relay.auth import commands as auth
    from relay.canary.sender import route_issues

    cfg = _load(config_path, warn=True)
    key_issues = auth.arc_key_issues(cfg) + route_issues(cfg)
    for issue in key_issues:
        click.echo(str(issue), err=True)
    if key_issues:
        sys.exit(1)
    for issue in config_mod.missing_secrets(cfg):
        click.echo(f"warning: {issue} (needed by relay serve)", err=True)
    for warning in auth.check_warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    if cfg.relay.archive.enabled:
        from relay.archive.commands import capacity_warning

        if capacity := capacity_warning(cfg.relay):
            click.echo(f"warning: {capacity}", err=True)
    table = PilotTable.build(cfg.pilots, cfg.relay)
    now = datetime.now(UTC)
    rows = [("address", "group", "mode", "legacy", "new", "cutover")]
    for e in cfg.pilots.pilots:
        r = route(e.address, table, now)
        by = {d.provider: d.delivered_to for d in r.deliveries}
        mode = r.deliveries[0].mode if r.deliveries else e.mode
        rows.append(
            (
                e.address,
                e.group or "-",
                mode or "-",
                by.get("legacy", "-"),
                by.get("new", "-"),
                e.cutover_at.isoformat() if e.cutover_at else "-",
            )
        )
    rows.append(("(anyone else)", "-", "-", "rcpt", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    click.echo(
        f"ok: {len(cfg.pilots.pilots)} pilot entries, domains {', '.join(cfg.relay.domains)}"
    )


@cli.command("route")
@config_option
@click.argument("address")
@click.option("--forwarded", is_flag=True, help="Route as a copy forwarded by legacy.")
@click.option("--at", "at", help="Route as of this instant (RFC 3339).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def route_cmd(
    config_path: str, address: str, forwarded: bool, at: str | None, as_json: bool
) -> None:
    """Dry run: where mail to ADDRESS goes."""
    cfg = _load(config_path)
    now = parse_time(at) if at else datetime.now(UTC)
    resolved = resolve_recipient(address, cfg.relay)
    if resolved is None:
        if as_json:
            click.echo(
                json.dumps(
                    {"address": address, "accepted": False, "reply": "550 5.7.1 Relaying denied"}
                )
            )
        else:
            click.echo(f"{address}: refused: 550 5.7.1 Relaying denied")
        sys.exit(1)
    rcpt, via_forward = resolved
    r = route(rcpt, PilotTable.build(cfg.pilots, cfg.relay), now, forwarded or via_forward)
    if as_json:
        out = {
            "address": r.recipient,
            "accepted": True,
            "forwarded": r.forwarded,
            "entry": r.entry,
            "discarded": r.discarded,
            "deliveries": [asdict(d) for d in r.deliveries],
        }
        click.echo(json.dumps(out, indent=2))
        return
    decided = f"entry {r.entry}" if r.entry else "not a pilot (no entry)"
    kind = "forwarded copy" if r.forwarded else "recipient"
    click.echo(f"{kind} {r.recipient}: decided by {decided}")
    if r.discarded:
        click.echo("  discarded: legacy already holds the original")
    for d in r.deliveries:
        click.echo(
            f"  {d.provider:<6}  {d.delivered_to}  {d.role}  group={d.group or '-'}"
            f"  mode={d.mode or '-'}"
        )


@cli.command()
@config_option
@click.option("--worker", type=click.IntRange(0), default=None, hidden=True)
def serve(config_path: str, worker: int | None) -> None:
    """Run the relay in the foreground (with `workers: N > 1`, a supervisor of N workers)."""
    from relay import app

    cfg = _load(config_path, warn=worker is None)
    missing = config_mod.missing_secrets(cfg)
    for issue in missing:
        click.echo(str(issue), err=True)
    if missing:
        sys.exit(1)
    sys.exit(app.run(cfg, worker))


@cli.command("auth-test")
@config_option
@click.argument("eml", type=click.File("rb"))
@click.option("--client-ip", required=True, help="The address the message came from.")
@click.option("--mail-from", required=True, help='The envelope sender ("" for <>).')
@click.option("--helo", default="", help="The client's EHLO name.")
@click.option("--json", "as_json", is_flag=True, help="The verdict as the received event has it.")
def auth_test(
    config_path: str, eml: BinaryIO, client_ip: str, mail_from: str, helo: str, as_json: bool
) -> None:
    """Judge one message offline (SPF, DKIM, DMARC, ARC) and print the header it would get."""
    from relay.auth import commands as auth

    cfg = _load(config_path)
    try:
        judgement = auth.auth_test(cfg, eml.read(), client_ip, mail_from.strip("<>"), helo)
    except auth.ArcKeyError as exc:
        click.echo(f"error: auth.arc.key_file: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(judgement.verdict.to_dict()))
        return
    texts = dict(judgement.prepend)
    for provider, text in texts.items():
        if len(set(texts.values())) > 1:
            click.echo(f"# {provider}:")
        click.echo(text.replace("\r\n", "\n"), nl=False)
        if len(set(texts.values())) == 1:
            break
    click.echo(f"# class: {judgement.verdict.auth_class}")


@cli.group()
def queue() -> None:
    """Inspect and manage the spool (safe while `relay serve` runs)."""


def _queue_settings(config_path: str) -> config_mod.RelaySettings:
    return _or_exit(config_mod.load_relay, config_path)[0]


@queue.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def queue_list(config_path: str, as_json: bool) -> None:
    """One line per queued message: id, age, sender, states per provider, next attempt."""
    from relay import queue_admin as q

    settings = _queue_settings(config_path)
    views = q.list_messages(settings)
    if as_json:
        click.echo(json.dumps(views, indent=2))
        return
    click.echo(f"{'queue id':<24} {'age':>8}  {'next':>8}  sender / states")
    for v in views:
        states = "  ".join(
            f"{p}: " + ",".join(f"{n} {s}" for s, n in sorted(c.items()))
            for p, c in sorted(v["states"].items())
        )
        nxt = "-" if v["next_attempt_in_s"] is None else f"{v['next_attempt_in_s']:.0f}s"
        click.echo(
            f"{v['queue_id']:<24} {v['age_s']:>7.0f}s  {nxt:>8}  "
            f"<{v['sender']}>{' (DSN)' if v['dsn'] else ''}  {states}"
        )
    click.echo(f"{len(views)} message(s) queued")


@queue.command("show")
@config_option
@click.argument("queue_id")
def queue_show(config_path: str, queue_id: str) -> None:
    """Envelope, plan, each delivery's state and last reply (JSON)."""
    from relay import queue_admin as q

    view = q.show_message(_queue_settings(config_path), queue_id)
    if view is None:
        click.echo(f"{queue_id}: not in the queue", err=True)
        sys.exit(1)
    click.echo(json.dumps(view, indent=2))


@queue.command("retry")
@config_option
@click.argument("queue_id", required=False)
def queue_retry(config_path: str, queue_id: str | None) -> None:
    """Make deferred deliveries (of one message, or all) due now."""
    _queue_manage(config_path, "retry", queue_id, None)


@queue.command("delete")
@config_option
@click.argument("queue_id")
@click.option("--provider", type=click.Choice(["legacy", "new", "bounce"]))
def queue_delete(config_path: str, queue_id: str, provider: str | None) -> None:
    """Remove a message's open deliveries (all, or one provider's) without a DSN."""
    _queue_manage(config_path, "delete", queue_id, provider)


def _queue_manage(config_path: str, op: str, queue_id: str | None, provider: str | None) -> None:
    from relay import queue_admin as q

    try:
        answer = q.manage(_queue_settings(config_path), op, queue_id, provider)
    except (q.QueueError, PseudonymKeyMissing) as exc:  # the key: to log `deleted` hashed
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if "error" in answer:
        click.echo(f"error: {answer['error']}", err=True)
        sys.exit(1)
    done = "made due now" if op == "retry" else "deleted"
    click.echo(f"{answer['count']} deliveries {done}")


@cli.command()
@click.option("--messages", default=200, show_default=True, type=click.IntRange(1, 5000))
@click.option("--out", default="relay-demo", show_default=True, type=click.Path(file_okay=False))
def demo(messages: int, out: str) -> None:
    """Run the relay and two stand-in providers on loopback with sample traffic."""
    from pathlib import Path

    from relay import demo as demo_mod

    click.echo(demo_mod.main(messages, Path(out)))
    click.echo(f"wrote {out}/deliveries.jsonl and {out}/report.json")


@cli.command("hash")
@click.argument("values", metavar="ADDR...", nargs=-1, required=True)
def hash_command(values: tuple[str, ...]) -> None:
    """Print the pseudonym of each address (or <Message-ID>) under $RELAY_PSEUDONYM_KEY.

    The same pseudonym `log_privacy: hash` writes and `relay report --pseudonymize`
    shows, so a user can be found in either.
    """
    try:
        p = Pseudonymizer.from_env()
    except PseudonymKeyMissing as exc:
        click.echo(f"relay hash: {exc}", err=True)
        sys.exit(2)
    for v in values:
        mid = v.startswith("<") and v.endswith(">")
        click.echo(p.message_id(v) if mid else p.address(v))


# -- the archive and replays (SPEC Part 2 "Safety net"; relay/archive/) -----------------


def _window(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    return (
        parse_time(since).timestamp() if since else None,
        parse_time(until).timestamp() if until else None,
    )


def _archive_fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


identity_option = click.option(
    "--identity", "identities", multiple=True, type=click.Path(dir_okay=False, exists=True),
    help="age identity file (age-keygen format); repeat for keys of older archives",
)  # fmt: skip
since_option = click.option("--since", help="Received at or after T (RFC 3339 or a date).")
until_option = click.option("--until", help="Received before T (RFC 3339 or a date).")
user_option = click.option("--user", "users", multiple=True, metavar="ADDR",
                           help="Only messages to this address (repeatable).")  # fmt: skip


@cli.group()
def archive() -> None:
    """The encrypted archive of accepted messages (list and delete need no key)."""


@archive.command("list")
@config_option
@since_option
@until_option
@click.option("--group", "groups", multiple=True, help="Only messages with this group.")
@user_option
@click.option("--json", "as_json", is_flag=True)
def archive_list(
    config_path: str, since: str | None, until: str | None, groups: tuple[str, ...],
    users: tuple[str, ...], as_json: bool,
) -> None:  # fmt: skip
    """One line per archived message: id, received, groups, recipients, size."""
    from relay.archive import commands

    try:
        store = commands.open_store(_queue_settings(config_path))
        entries = store.select(*_window(since, until), users)
    except commands.ArchiveError as exc:
        _archive_fail(exc)
    entries = [e for e in entries if not groups or set(groups) & set(e.groups)]
    if as_json:
        click.echo(json.dumps([commands.describe(e) for e in entries], indent=2))
        return
    for e in entries:
        click.echo(f"{e.queue_id:<24} {e.received}  {','.join(e.groups) or '-':<16} "
                   f"{len(e.rcpts):>3} rcpt  {e.size:>9} B  {e.file}")  # fmt: skip
    click.echo(f"{len(entries)} message(s), {sum(e.size for e in entries):,} bytes")


@archive.command("export")
@config_option
@click.option("--user", required=True, metavar="ADDR", help="The user whose mail to export.")
@since_option
@until_option
@identity_option
@click.option("--out", "-o", default="relay-export", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the <id>.eml files.")  # fmt: skip
def archive_export(
    config_path: str, user: str, since: str | None, until: str | None,
    identities: tuple[str, ...], out: str,
) -> None:  # fmt: skip
    """Write one user's archived messages of a period as EML files (needs --identity)."""
    from pathlib import Path

    from relay.archive import commands, crypto

    try:
        store = commands.open_store(_queue_settings(config_path))
        keys = crypto.load_identities(Path(i) for i in identities) if identities else []
        entries = store.select(*_window(since, until), [user])
        written, problems = commands.export(store, entries, keys, Path(out))
    except commands.ArchiveError as exc:
        _archive_fail(exc)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(f"{len(written)} message(s) written to {out}")
    sys.exit(1 if problems else 0)


@archive.command("delete")
@config_option
@click.option("--user", required=True, metavar="ADDR", help="The data subject.")
def archive_delete(config_path: str, user: str) -> None:
    """Delete every archived message to ADDR (a data-subject request), whole."""
    from relay.archive import commands
    from relay.log import DeliveryLog

    settings = _queue_settings(config_path)
    try:
        store = commands.open_store(settings)
        log = DeliveryLog.for_settings(settings)
        try:
            removed = commands.delete_user(store, user, log)
        finally:
            log.close()
    except (commands.ArchiveError, OSError) as exc:
        _archive_fail(exc)
    others = sum(1 for e in removed if len(e.rcpts) > 1)
    click.echo(f"{len(removed)} message(s) deleted ({others} also addressed to others)")


@archive.command("purge")
@config_option
def archive_purge(config_path: str) -> None:
    """Apply archive.retention_days now (the running relay does it daily)."""
    from relay.archive import commands
    from relay.log import DeliveryLog

    settings = _queue_settings(config_path)
    try:
        store = commands.open_store(settings)
        log = DeliveryLog.for_settings(settings)
        try:
            count, size = commands.purge(store, settings.archive.retention_days, log)
        finally:
            log.close()
    except (commands.ArchiveError, OSError) as exc:
        _archive_fail(exc)
    click.echo(f"{count} message(s) purged ({size:,} bytes)")


def _rate(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        rate = float(value.removesuffix("/s"))
    except ValueError:
        rate = 0.0
    if rate <= 0:
        raise click.BadParameter(f"{value!r} is not a positive rate like 10/s", ctx, param)
    return rate


@cli.command()
@config_option
@click.option("--to", "provider", required=True, type=click.Choice(["legacy", "new"]))
@click.option("--since", required=True, help="Received at or after T (RFC 3339 or a date).")
@until_option
@click.option("--group", "groups", multiple=True, help="Only this group (repeatable).")
@user_option
@identity_option
@click.option(
    "--log",
    "logs",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Delivery logs to read (default: the configured log and its rotations).",
)
@click.option(
    "--only-missing/--all",
    default=True,
    show_default=True,
    help="Skip pairs the delivery logs show the provider has.",
)
@click.option("--dry-run", is_flag=True, help="List what would be replayed; send nothing.")
@click.option("--rate", default="10/s", show_default=True, callback=_rate,
              help="Replays queued per second.")  # fmt: skip
def replay(
    config_path: str, provider: Literal["legacy", "new"], since: str, until: str | None,
    groups: tuple[str, ...], users: tuple[str, ...], identities: tuple[str, ...],
    logs: tuple[str, ...], only_missing: bool, dry_run: bool, rate: float,
) -> None:  # fmt: skip
    """Send archived mail since T again to one provider, through the spool."""
    from pathlib import Path

    from relay.archive import commands, crypto
    from relay.archive import replay as rp

    cfg = _load(config_path)
    try:
        store = commands.open_store(cfg.relay)
        keys = crypto.load_identities(Path(i) for i in identities) if identities else []
        chosen = rp.select(
            cfg, store, keys, provider, *_window(since, until), groups, users,
            [Path(p) for p in logs] if logs else None, only_missing,
        )  # fmt: skip
    except commands.ArchiveError as exc:
        _archive_fail(exc)
    for problem in chosen.problems:
        click.echo(f"error: {problem}", err=True)
    outcome = None if dry_run else rp.enqueue(cfg, chosen.candidates, rate)
    queued = dict((id(c), q) for c, q in outcome.queued) if outcome else {}
    for c in chosen.candidates:
        done = f"  queued as {queued[id(c)]}" if id(c) in queued else ""
        click.echo(f"{c.entry.queue_id:<24} {c.entry.received}  {c.rcpt} -> {provider} "
                   f"{c.plan.delivered_to}  [{c.plan.group or '-'}]{done}")  # fmt: skip
    skipped = f"; {chosen.present} already at {provider}" if only_missing else ""
    if outcome is None:
        click.echo(f"dry run: {len(chosen.candidates)} to replay{skipped}; nothing sent")
    else:
        when = "" if outcome.picked_up else " (no running relay took them: sent when it starts)"
        click.echo(f"{len(outcome.queued)} replay(s) queued{when}{skipped}")
    sys.exit(1 if chosen.problems else 0)


cli.add_command(report_command)
cli.add_command(probe_group(config_option, _load))


def main() -> None:
    cli()
