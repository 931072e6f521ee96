"""Inbound SMTP: check, queue durably, answer. Never talks to a provider.

- `server`: `Ingress` (listening, one session per connection, shutdown) and
  `IngressHandler`, which wires sessions to the policy and the intake.
- `protocol`: `RelaySMTP`, the relay's SMTP dialogue of one session on the engine.
- `policy`: connection caps, the relay check, recipient resolution, the
  `rejected` event (bounded per session).
- `receiving`: one message into the spool (trace headers, loop check) and
  its durable enqueue.
- `dataread`: the streaming DATA parser; `replies`: every reply's code and text.
- `clienttext`: envelope addresses no provider could take, and the escaping of
  client text for headers and logs.
- `engine`: the SMTP engine (command loop, replies, the standard commands),
  ours since issue 20 (aiosmtpd's per-session machinery cost more than the rest).
"""

from relay.ingress.server import Ingress, IngressHandler

__all__ = ["Ingress", "IngressHandler"]
