"""`relay probe [check|once] -c FILE`: the probe's commands, added to relay.cli's group.

`probe_group` receives relay.cli's `-c` option and loader, so the probe's
commands read the configuration exactly as the others do and the two modules
do not import each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from relay import config as config_mod
from relay.probe.config import ProbeProvider, placement_secrets
from relay.report.inputs import parse_bound

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _probed(cfg: config_mod.Config) -> dict[str, ProbeProvider]:
    """The providers to probe, or exit 1 saying why there are none / secrets are missing."""
    providers = cfg.relay.placement.providers
    if not providers:
        click.echo(f"{cfg.shown}: placement.providers: no provider to probe", err=True)
        sys.exit(1)
    missing = placement_secrets(cfg.relay.placement)
    for loc, msg in missing:
        line = cfg.line_of(loc)
        click.echo(f"{cfg.shown}:{line}: {'.'.join(loc)}: {msg}" if line else msg, err=True)
    if missing:
        sys.exit(1)
    return providers


def probe_group(config_option: Decorator, load: Callable[[str], config_mod.Config]) -> click.Group:
    """The `relay probe` group, built around relay.cli's `-c` option and loader."""

    @click.group("probe", invoke_without_command=True)
    @config_option
    @click.pass_context
    def probe(ctx: click.Context, config_path: str) -> None:
        """Run the placement probe (where each pilot copy was filed) in the foreground."""
        if ctx.invoked_subcommand is not None:
            return
        from relay.probe import daemon

        cfg = load(config_path)
        if not cfg.relay.placement.enabled:
            click.echo(f"{cfg.shown}: placement.enabled: false; nothing to probe", err=True)
            sys.exit(1)
        _probed(cfg)
        sys.exit(daemon.run(cfg))

    @probe.command("check")
    @config_option
    @click.option("--user", "user", metavar="ADDR", help="Mailbox to try (default: a pilot's).")
    def check(config_path: str, user: str | None) -> None:
        """Log in to each probed provider and resolve its junk folders."""
        from relay.probe.commands import check_provider, sample_login
        from relay.probe.errors import ProbeError

        cfg = load(config_path)
        failed = 0
        for name, settings in _probed(cfg).items():
            login = settings.login_for(user) if user else sample_login(cfg, name, settings)
            if login is None:
                click.echo(f"{name}: FAILED no pilot mailbox here to log in to (use --user)")
                failed += 1
                continue
            try:
                click.echo(check_provider(name, settings, login))
            except ProbeError as exc:
                click.echo(f"{name}: FAILED {settings.host}:{settings.port} login {login}: {exc}")
                failed += 1
        sys.exit(1 if failed else 0)

    @probe.command("once")
    @config_option
    @click.option("--since", "since", metavar="T", required=True, help="Copies delivered since T.")
    @click.option("--user", "user", metavar="ADDR", help="Only this pilot (old or new address).")
    def once_cmd(config_path: str, since: str, user: str | None) -> None:
        """Look once, now, for the copies delivered since T, and print where each is."""
        from relay.probe.commands import once

        cfg = load(config_path)
        _probed(cfg)
        try:
            t = parse_bound(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
        sys.exit(1 if once(cfg, t, user, click.echo) else 0)

    return probe
