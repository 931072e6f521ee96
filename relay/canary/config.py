"""The `canary:` section of relay.yaml; imports nothing of the relay's so relay.config
can embed it (as it does `placement:`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CanaryDkim(_Strict):
    domain: str = "canary.example.org"
    selector: str = "c1"
    key_file: Path | None = None  # PEM RSA key; null: canaries go out unsigned


class CanaryMailboxes(_Strict):
    legacy: str = "canary@example.com"
    new: str = "canary@example-new.com"


class CanarySettings(_Strict):
    enabled: bool = False
    every: float = Field(900, gt=0)  # seconds between two canaries
    from_: str = Field("canary@canary.example.org", alias="from")
    dkim: CanaryDkim = CanaryDkim()
    mailboxes: CanaryMailboxes = CanaryMailboxes()
    timeout: float = Field(3600, gt=0)  # not found by then (after the 250, or sent): missing
    delete_after_verify: bool = True  # the canary mailboxes only
    idle: bool = True  # the probe IDLEs in the canary mailboxes where the server offers it
    idle_renew: float = Field(300, gt=0, le=1740)  # IDLE re-issued within RFC 2177's 29 min
    poll: float = Field(30, gt=0)  # seconds between looks while a canary is awaited

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def resolved(self, base: Path) -> CanarySettings:
        """`dkim.key_file` made absolute relative to relay.yaml's folder."""
        key = None if self.dkim.key_file is None else (base / self.dkim.key_file).resolve()
        return self.model_copy(update={"dkim": self.dkim.model_copy(update={"key_file": key})})
