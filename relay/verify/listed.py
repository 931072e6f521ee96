"""`recipients: FILE`: the valid addresses, reloaded like the pilot file.

An address matches its line case-insensitively, its domain in ASCII form, and
with `recipient_delimiter` its subaddress matches the bare address
(`alice+tag@` is `alice@`, as Postfix's local_recipient_maps); `*@domain`
matches every address of exactly that domain.
"""

from __future__ import annotations

from relay import config
from relay.log import oplog


def listed(table: config.RecipientsFile, address: str, delimiter: str) -> bool:
    local, _, domain = address.rpartition("@")
    domain = config.ascii_domain(domain)
    if domain in table.wildcards:
        return True
    local = local.lower()
    if f"{local}@{domain}" in table.addresses:
        return True
    base = local.split(delimiter, 1)[0] if delimiter else local
    return base != local and f"{base}@{domain}" in table.addresses


class RecipientList:
    """The recipients table in force; an invalid edit is logged and the last good one stays."""

    def __init__(self, cfg: config.Config):
        assert cfg.recipients is not None and cfg.recipients_path is not None
        self.cfg = cfg
        self.path = cfg.recipients_path
        self.table = cfg.recipients
        self.delimiter = cfg.relay.recipient_delimiter
        self.refused = 0  # edits refused so far (an operator's, or a test's, signal)

    def known(self, address: str) -> bool:
        return listed(self.table, address, self.delimiter)

    def reload(self) -> bool:
        try:
            table = config.load_recipients(self.path, self.cfg.recipients_shown, self.cfg.relay)
        except config.ConfigError as exc:
            for issue in exc.issues:
                oplog.error("recipients edit refused; last good list stays", problem=str(issue))
            self.refused += 1
            return False
        self.table = table
        oplog.info("recipients reloaded", entries=len(table.addresses) + len(table.wildcards))
        return True
