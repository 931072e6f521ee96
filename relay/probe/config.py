"""The `placement:` section of relay.yaml (SPEC Part 2 "Where mail lands: placement").

Kept apart from relay.config so the probe's settings, checks and secrets sit
with the probe; relay.config embeds `PlacementSettings` and calls
`placement_issues` / `placement_secrets`, and this module imports nothing of
the relay's, so the two cannot import each other in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROBED_NAMES = ("legacy", "new")
MS_DEFAULT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_DEFAULT_SCOPE = "https://mail.google.com/"
DEFAULT_JUNK_NAMES = ("Junk", "Spam", "Junk Email", "[Gmail]/Spam")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OAuthSettings(_Strict):
    kind: Literal["command", "google_service_account", "ms_client_credentials"] = "command"
    command: str | None = None
    key_file: Path | None = None
    scope: str = GOOGLE_DEFAULT_SCOPE
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    authority: str = "https://login.microsoftonline.com"

    def effective_scope(self) -> str:
        """Microsoft's IMAP scope when the Google default was left in place for ms_*."""
        if self.kind == "ms_client_credentials" and self.scope == GOOGLE_DEFAULT_SCOPE:
            return MS_DEFAULT_SCOPE
        return self.scope

    def client_secret(self) -> str | None:
        return os.environ.get(self.client_secret_env) if self.client_secret_env else None


class ProbeProvider(_Strict):
    method: Literal["imap"] = "imap"
    host: str = "imap.example.com"
    port: int = Field(993, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: Path | None = None
    user: str = "{delivered_to}"
    auth: Literal["password", "xoauth2"] = "password"
    password_env: str | None = None
    oauth: OAuthSettings = OAuthSettings()
    junk_folders: Literal["auto"] | tuple[str, ...] = "auto"
    max_sessions: int = Field(2, ge=1, le=32)
    timeout: float = Field(60, gt=0)

    @field_validator("user")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(delivered_to="a@b", local="a", domain="b")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"not a template of {{delivered_to}}, {{local}}, {{domain}}: {exc}"
            ) from None
        return v

    def password(self) -> str | None:
        return os.environ.get(self.password_env) if self.password_env else None

    def login_for(self, delivered_to: str) -> str:
        """The IMAP login of the mailbox holding `delivered_to` (the `user` template)."""
        local, _, domain = delivered_to.rpartition("@")
        return self.user.format(delivered_to=delivered_to, local=local, domain=domain.lower())


class PlacementSettings(_Strict):
    enabled: bool = False
    log: Path = Path("../var/placement.jsonl")
    state: Path | None = None  # default: beside the log, `<log>.state`
    delays: tuple[float, ...] = (120, 900, 3600, 21600)
    give_up_after: float = Field(86400, gt=0)
    sample: float = Field(1.0, ge=0, le=1)
    metrics_port: int = Field(9326, ge=0, le=65535)
    providers: dict[str, ProbeProvider] = {}

    @field_validator("delays")
    @classmethod
    def _delays(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive seconds")
        return tuple(sorted(v))

    @field_validator("providers")
    @classmethod
    def _names(cls, v: dict[str, ProbeProvider]) -> dict[str, ProbeProvider]:
        unknown = sorted(set(v) - set(PROBED_NAMES))
        if unknown:
            raise ValueError(f"unknown provider {', '.join(unknown)}; expected legacy or new")
        return v

    @property
    def state_path(self) -> Path:
        return self.state or self.log.with_name(self.log.name + ".state")

    def looks(self, give_up: float | None = None) -> tuple[float, ...]:
        """Seconds after the provider's 250 of each look; the last one (at `give_up`, by
        default `give_up_after`) decides "missing"."""
        last = self.give_up_after if give_up is None else give_up
        return (*(d for d in self.delays if d < last), last)

    def resolved(self, base: Path) -> PlacementSettings:
        """Paths made absolute relative to relay.yaml's folder."""

        def rel(p: Path | None) -> Path | None:
            return None if p is None else (base / p).resolve()

        providers = {
            name: p.model_copy(
                update={
                    "ca_file": rel(p.ca_file),
                    "oauth": p.oauth.model_copy(update={"key_file": rel(p.oauth.key_file)}),
                }
            )
            for name, p in self.providers.items()
        }
        return self.model_copy(
            update={"log": rel(self.log), "state": rel(self.state), "providers": providers}
        )


# (dotted key under placement.providers.NAME, message)
Issue = tuple[tuple[str, ...], str]


def placement_issues(s: PlacementSettings) -> list[Issue]:
    """Cross-key problems of the section (files that must exist, keys that go together)."""
    issues: list[Issue] = []
    for name, p in s.providers.items():
        loc = ("placement", "providers", name)
        if p.ca_file is not None and not p.ca_file.is_file():
            issues.append(((*loc, "ca_file"), f"{p.ca_file}: file not found"))
        if p.auth == "password" and not p.password_env:
            issues.append(((*loc, "password_env"), "needed with auth: password"))
        o = p.oauth
        oloc = (*loc, "oauth")
        if p.auth != "xoauth2":
            continue
        if o.kind == "command" and not o.command:
            issues.append(((*oloc, "command"), "needed with kind: command"))
        if o.kind == "google_service_account":
            if o.key_file is None:
                issues.append(((*oloc, "key_file"), "needed with kind: google_service_account"))
            elif not o.key_file.is_file():
                issues.append(((*oloc, "key_file"), f"{o.key_file}: file not found"))
        if o.kind == "ms_client_credentials":
            for key in ("tenant_id", "client_id", "client_secret_env"):
                if not getattr(o, key):
                    issues.append(((*oloc, key), "needed with kind: ms_client_credentials"))
    return issues


def placement_secrets(s: PlacementSettings) -> list[Issue]:
    """Environment variables the probe needs that are not set (fatal for `relay probe`)."""
    missing: list[Issue] = []
    for name, p in s.providers.items():
        loc = ("placement", "providers", name)
        if p.auth == "password" and p.password_env and p.password() is None:
            missing.append(
                ((*loc, "password_env"), f"environment variable {p.password_env} is not set")
            )
        env = p.oauth.client_secret_env
        ms = p.auth == "xoauth2" and p.oauth.kind == "ms_client_credentials"
        if ms and env and os.environ.get(env) is None:
            missing.append(
                ((*loc, "oauth", "client_secret_env"), f"environment variable {env} is not set")
            )
    return missing
