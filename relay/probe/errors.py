"""Why a look at a mailbox failed: a reason for the error metric and a detail for the log."""

from __future__ import annotations

# Reasons (the `reason` label of relay_probe_errors_total).
REASONS = ("connect", "tls", "login", "token", "timeout", "protocol")


class ProbeError(Exception):
    """A look that could not be made; its pairs stay due, or end `unknown` at the last look."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
