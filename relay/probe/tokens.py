"""Access tokens for XOAUTH2 logins: a command, a Google service account, a Microsoft app.

Each source hands out a token for one mailbox login and raises ProbeError
("token", why) when it cannot, so a bad key or an expired secret is one
`unknown` result and one error metric, never a crash. The cloud kinds cache
tokens until shortly before they expire; they are built lazily, so google-auth
and msal are imported only where those kinds are configured.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
from typing import Any, Protocol

from relay.probe.config import OAuthSettings
from relay.probe.errors import ProbeError

COMMAND_TIMEOUT = 30.0
TOKEN_ENDPOINT_TIMEOUT = 30.0


class TokenSource(Protocol):
    def token(self, user: str) -> str: ...


class CommandToken:
    """mutt/isync convention: a command prints the access token on stdout; {user} expands."""

    def __init__(self, command: str):
        self.command = command

    def token(self, user: str) -> str:
        cmd = self.command.replace("{user}", shlex.quote(user))
        try:
            res = subprocess.run(
                cmd, shell=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            why = f"token command timed out after {COMMAND_TIMEOUT:g} s"
            raise ProbeError("token", why) from None
        token = res.stdout.strip()
        if res.returncode != 0 or not token:
            why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}, no token"])[-1]
            raise ProbeError("token", f"token command failed: {why[:200]}")
        return token


class GoogleServiceAccount:
    """Domain-wide delegation: one credential per mailbox (`subject`), from the JSON key.

    google-auth posts the signed JWT to the key file's own `token_uri`, which is
    how the tests point it at a loopback stub.
    """

    def __init__(self, settings: OAuthSettings):
        self.settings = settings
        self._creds: dict[str, Any] = {}
        self._lock = threading.Lock()

    def token(self, user: str) -> str:
        from google.auth.exceptions import GoogleAuthError
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        with self._lock:
            creds = self._creds.get(user)
            try:
                if creds is None:
                    creds = service_account.Credentials.from_service_account_file(
                        str(self.settings.key_file),
                        scopes=[self.settings.effective_scope()],
                        subject=user,
                    )
                    self._creds[user] = creds
                if not creds.valid:
                    creds.refresh(Request())
            except (GoogleAuthError, OSError, ValueError) as exc:
                raise ProbeError("token", f"google service account: {_short(exc)}") from None
            return str(creds.token)


class MsClientCredentials:
    """Microsoft 365 client credentials (an app with IMAP.AccessAsApp); msal caches the token."""

    def __init__(self, settings: OAuthSettings):
        self.settings = settings
        self._app: Any = None
        self._lock = threading.Lock()

    def _application(self) -> Any:
        import msal

        s = self.settings
        authority = f"{s.authority.rstrip('/')}/{s.tenant_id}"
        return msal.ConfidentialClientApplication(
            s.client_id,
            client_credential=s.client_secret(),
            authority=authority,
            # a configured authority (sovereign cloud, loopback stub) is taken as given
            instance_discovery=False,
            timeout=TOKEN_ENDPOINT_TIMEOUT,
        )

    def token(self, user: str) -> str:
        with self._lock:
            try:
                if self._app is None:
                    self._app = self._application()
                result = self._app.acquire_token_for_client(
                    scopes=[self.settings.effective_scope()]
                )
            except Exception as exc:  # msal raises ValueError, requests' errors, its own
                raise ProbeError("token", f"microsoft client credentials: {_short(exc)}") from None
        if "access_token" not in result:
            why = result.get("error_description") or result.get("error") or "no access_token"
            raise ProbeError("token", f"microsoft client credentials: {str(why)[:200]}")
        return str(result["access_token"])


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def token_source(settings: OAuthSettings) -> TokenSource:
    if settings.kind == "google_service_account":
        return GoogleServiceAccount(settings)
    if settings.kind == "ms_client_credentials":
        return MsClientCredentials(settings)
    assert settings.command is not None  # checked by placement_issues
    return CommandToken(settings.command)
