"""The `relay` command line: parse arguments, call one module, set the exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TypeVar

import click

from relay import config as config_mod
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
    cfg = _load(config_path, warn=True)
    for issue in config_mod.missing_secrets(cfg):
        click.echo(f"warning: {issue} (needed by relay serve)", err=True)
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
    from relay import queue as q

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
    from relay import queue as q

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
    from relay import queue as q

    try:
        answer = q.manage(_queue_settings(config_path), op, queue_id, provider)
    except q.QueueError as exc:
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


cli.add_command(report_command)
cli.add_command(probe_group(config_option, _load))


def main() -> None:
    cli()
