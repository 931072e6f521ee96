"""`auth_failure_hold`: one login attempt per hold, not one per queued message.

A provider locks an account after a few failed logins, and a wrong password
fails every message the same way. So after an AUTH-stage failure (530, 534,
535, 538, AUTH not offered) the provider's deliveries wait `auth_failure_hold`
seconds; then one attempt alone tries again (a probe), and the others follow
only once a login has worked. The same goes from the start for a provider that
logs in: its first attempt is alone until one gets past AUTH, so a relay
restarted with 1,000 queued messages and a wrong password fails one login, not
`max_connections`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from relay.config import ProviderSettings
from relay.delivery.reply import Reply


class AuthHold:
    """The hold and the probe of one destination (provider settings)."""

    def __init__(self, cfg: ProviderSettings) -> None:
        self.hold = cfg.auth_failure_hold
        self.until = 0.0  # held (clock time) until then
        self.trusted = not cfg.username  # a login worked since the start or the last failure
        self.probing = False  # an attempt that must log in is under way

    def pause(self, now: float) -> float | None:
        """Seconds to wait before taking another delivery (inf: until the probe is
        back); None when one may be taken now."""
        if now < self.until:
            return self.until - now
        if not self.trusted and self.probing:
            return math.inf
        return None

    def taken(self) -> None:
        """A delivery was taken: while untrusted, it is the probe."""
        if not self.trusted:
            self.probing = True

    def settle(self, replies: Iterable[Reply], now: float) -> bool:
        """An attempt is over (`replies` empty: none was made). An AUTH fault starts
        a hold; getting past AUTH (an accepted recipient, or a refusal after AUTH)
        trusts the login. True when others waiting on this attempt may look again."""
        was_probe, self.probing = self.probing, False
        replies = list(replies)
        if any(r.auth_fault for r in replies):
            self.until = now + self.hold
            self.trusted = False
        elif any(r.ok or r.stage not in ("connect", "tls", "auth") for r in replies):
            self.trusted = True
        return was_probe
