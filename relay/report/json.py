"""`relay report --format json`: the report's document (`Report.to_dict`), indented."""

from __future__ import annotations

import json

from relay.report.model import Report


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
