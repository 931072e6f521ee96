"""`relay report --format csv`: one row per (message, recipient) pair, streamed.

Rows are written as each message closes (docs/report.md, "csv"), so the CSV of a
large log needs no more memory than the report itself.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable
from datetime import date, datetime
from typing import Any, TextIO

from relay.privacy import Pseudonymizer
from relay.report.format import num
from relay.report.logs import build_report
from relay.report.model import PROVIDERS, PairRow, Report

ExtraColumns = tuple[tuple[str, ...], Callable[[PairRow], list[Any]]]

CSV_COLUMNS: tuple[str, ...] = (
    "node",
    "queue_id",
    "received",
    "rcpt",
    "group",
    "pilot",
    "forwarded",
    "discarded",
    *(
        f"{p}_{c}"
        for p in PROVIDERS
        for c in (
            "outcome",
            "code",
            "enhanced",
            "latency_ms",
            "attempt",
            "deferrals",
            "reason",
            "response",
        )
    ),
    "divergence",
    "class",
    "auth_class",
)


def _csv_values(row: PairRow) -> list[Any]:
    vals: list[Any] = [
        row.node,
        row.queue_id,
        row.received,
        row.rcpt,
        row.group,
        "true" if row.pilot else "false",
        "true" if row.forwarded else "false",
        "true" if row.discarded else "false",
    ]
    for o in (row.legacy, row.new):
        vals += [
            o.outcome,
            "" if o.smtp_code is None else o.smtp_code,
            o.enhanced_code or "",
            "" if o.latency_ms is None else num(o.latency_ms),
            "" if o.attempt is None else o.attempt,
            o.deferrals if o.outcome else "",
            o.reason or "",
            o.smtp_response or "",
        ]
    vals += [row.divergence, row.joined, row.auth_class]
    return vals


def write_csv(
    paths: Iterable[str | os.PathLike[str]],
    out: TextIO,
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    group: str | None = None,
    extra: ExtraColumns | None = None,
    *,
    pseudonymizer: Pseudonymizer | None = None,
) -> Report:
    """Stream one CSV row per (message, recipient) pair to `out`; returns the report too.

    `extra`: more columns after these and their values per row (the placement's).
    """
    w = csv.writer(out, lineterminator="\n")
    names, values = extra or ((), lambda row: [])
    w.writerow((*CSV_COLUMNS, *names))
    return build_report(
        paths,
        since,
        until,
        group,
        pair_sink=lambda row: w.writerow(_csv_values(row) + values(row)),
        pseudonymizer=pseudonymizer,
    )
