"""`relay report`: the click command, from arguments to one output format.

The renderers are imported when used: rich, pygal and jinja2 take tens of ms to
import, and the `relay` commands that import this one (all of them) need none.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import click

from relay.privacy import KEY_ENV, Pseudonymizer, PseudonymKeyMissing
from relay.report.canaries import canary_report
from relay.report.csv import write_csv
from relay.report.figures import load_thresholds
from relay.report.inputs import check_inputs, check_tz, parse_bound
from relay.report.logs import build_report
from relay.report.model import PROVIDERS, Report, ReportError, Thresholds
from relay.report.placement import attach_placement, placement_columns


def _bound_param(end: bool) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse_bound(value, end=end)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return convert


@click.command("report")
@click.argument("logs", metavar="LOG...", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv", "html"]),
    default="text",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--since",
    metavar="T",
    callback=_bound_param(False),
    help="Messages received at/after T (RFC 3339/date).",
)
@click.option(
    "--until",
    metavar="T",
    callback=_bound_param(True),
    help="Messages received before T (exclusive; a date means the end of that day).",
)
@click.option("--group", metavar="G", help="Only pairs of this group.")
@click.option(
    "--thresholds",
    "thresholds_path",
    metavar="FILE",
    help="YAML file overriding readiness thresholds.",
)
@click.option(
    "--tz",
    metavar="ZONE",
    default="UTC",
    show_default=True,
    help="Time zone of the times shown in text and HTML (IANA, e.g. Europe/Paris).",
)
@click.option(
    "--label",
    "label_args",
    metavar="PROVIDER=NAME",
    multiple=True,
    help='Show a provider as NAME (e.g. new="Microsoft 365"); default: the logs\' labels.',
)
@click.option(
    "--pseudonymize",
    is_flag=True,
    help=f"Replace local parts and Message-IDs by keyed hashes (key: ${KEY_ENV}).",
)
@click.option(
    "--placement",
    "placement",
    metavar="PLACEMENT_LOG",
    multiple=True,
    help="A placement log of `relay probe` (repeatable): the Placement section, and the "
    "providers' own verdicts for the fairness table.",
)
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
def report_command(
    logs: tuple[str, ...],
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    group: str | None,
    thresholds_path: str | None,
    placement: tuple[str, ...],
    tz: str,
    label_args: tuple[str, ...],
    pseudonymize: bool,
    output: str | None,
) -> None:
    """Comparison report (legacy vs new) from one or many delivery logs (.gz, rotated)."""
    ctx = click.get_current_context()
    try:
        check_inputs(logs)
        check_tz(tz)
        check_inputs(placement)
        thresholds = load_thresholds(thresholds_path) if thresholds_path else Thresholds()
        labels = _labels(label_args)
        pseudonymizer = Pseudonymizer.from_env() if pseudonymize else None
    except (ReportError, PseudonymKeyMissing) as exc:
        click.echo(f"relay report: {exc}" if isinstance(exc, PseudonymKeyMissing) else str(exc),
                   err=True)  # fmt: skip
        ctx.exit(2)
    try:
        if fmt == "csv":
            with _output(output) as out:
                extra = placement_columns(placement, since, until, group) if placement else None
                rep = write_csv(logs, out, since, until, group, extra, pseudonymizer=pseudonymizer)
            if rep.inputs.corrupt_lines or rep.inputs.orphan_events:
                click.echo(
                    f"relay report: {rep.inputs.corrupt_lines} corrupt lines, "
                    f"{rep.inputs.orphan_events} orphan events skipped",
                    err=True,
                )
            for err in rep.inputs.errors:
                click.echo(f"warning: {err}", err=True)
            return
        rep = build_report(
            logs, since, until, group, thresholds,
            pseudonymizer=pseudonymizer, labels=labels, tz=tz, placement=placement,
        )  # fmt: skip
        if placement:
            attach_placement(rep, placement, since, until, group)
        rep.canaries = canary_report(logs, placement, since, until)
        text = _render(fmt, rep)
        with _output(output) as out:
            out.write(text)
    except ReportError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(2)
    except OSError as exc:
        click.echo(f"{exc.filename or output}: {exc.strerror or exc}", err=True)
        ctx.exit(1)


def _labels(args: tuple[str, ...]) -> dict[str, str]:
    """`--label new="Microsoft 365"` options as {provider: label}."""
    labels = {}
    for arg in args:
        name, eq, label = arg.partition("=")
        if not eq or name not in PROVIDERS or not label.strip():
            raise ReportError(f"--label: expected legacy=NAME or new=NAME, not {arg!r}")
        labels[name] = label.strip()
    return labels


def _render(fmt: str, rep: Report) -> str:
    if fmt == "json":
        from relay.report.json import render_json

        return render_json(rep)
    if fmt == "html":
        from relay.report.html import render_html

        return render_html(rep)
    from relay.report.text import render_text

    return render_text(rep)


class _output:
    """`-o FILE` (written, newline="" for CSV) or stdout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.f: TextIO | None = None

    def __enter__(self) -> TextIO:
        if self.path is None or self.path == "-":
            return sys.stdout
        self.f = open(self.path, "w", encoding="utf-8", newline="")
        return self.f

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()
