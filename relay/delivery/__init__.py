"""How to talk to one provider once: one SMTP transaction, per-recipient replies.

The package's face for the scheduler; the parts, in the order a delivery uses
them: `hosts` (which hosts, in which order), `connect` (connection, TLS,
EHLO, AUTH), `content` (the spooled message read for streaming),
`transaction` (one pipelined MAIL/RCPT/DATA exchange), `reply` (what it
ends with, classified), `pool` (the `Agent`, which caches connections).
`_aiosmtplib` alone touches aiosmtplib's private names.
"""

from relay.delivery.content import Content
from relay.delivery.hosts import Hosts
from relay.delivery.pool import Agent
from relay.delivery.reply import Attempt, Reply

__all__ = ["Agent", "Attempt", "Content", "Hosts", "Reply"]
