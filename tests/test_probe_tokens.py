"""XOAUTH2 token sources against loopback token endpoints (HTTPS stubs with a test CA).

The Google stub checks the service account's signed JWT (RS256, with the key's
public half) and hands out a token per delegated mailbox; the Microsoft stub
serves the tenant's OpenID configuration and a client-credentials token. With
Dovecot installed, XOAUTH2 is also checked end to end: Dovecot's oauth2 passdb
asks a loopback introspection stub whether the token the probe sent is good.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay import dovecot as dovecot_mod
from relay.cli import cli
from relay.probe.config import OAuthSettings
from relay.probe.errors import ProbeError
from relay.probe.tokens import CommandToken, token_source
from tests.helpers_probe import PILOTS, probe_yaml

pytestmark = pytest.mark.timeout(60)


class Stub:
    """A loopback HTTPS token endpoint; `handle(method, path, form)` → (status, JSON)."""

    def __init__(self, ca: trustme.CA | None, handle: Any):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
                stub.requests.append((method, self.path, form))
                status, doc = handle(method, self.path, form)
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ca is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(ctx)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if ca is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A test CA the token clients trust (requests reads REQUESTS_CA_BUNDLE)."""
    authority = trustme.CA()
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    return authority


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture
def google(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Stub, Path]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key()

    def handle(method: str, path: str, form: dict[str, str]) -> tuple[int, Any]:
        assert method == "POST" and path == "/token"
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        head, payload, sig = form["assertion"].split(".")
        try:
            public.verify(
                _b64(sig), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except Exception:
            return 400, {"error": "invalid_grant", "error_description": "bad signature"}
        claims = json.loads(_b64(payload))
        assert claims["iss"] == "probe@pilot.iam.gserviceaccount.com"
        assert claims["scope"] == "https://mail.google.com/"
        return 200, {
            "access_token": f"g-{claims['sub']}",
            "expires_in": 3600,
            "token_type": "Bearer",
        }

    stub = Stub(ca, handle)
    pem = _pem(key)
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "pilot", "private_key_id": "k1",
        "private_key": pem, "client_email": "probe@pilot.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": f"{stub.url}/token",
    }))  # fmt: skip
    yield stub, key_file
    stub.close()


def test_google_service_account_uses_the_key_files_token_uri(google: tuple[Stub, Path]) -> None:
    stub, key_file = google
    source = token_source(OAuthSettings(kind="google_service_account", key_file=key_file))
    assert source.token("ann@example.com") == "g-ann@example.com"
    assert source.token("ann@example.com") == "g-ann@example.com"  # cached until it expires
    assert source.token("ben@example.com") == "g-ben@example.com"  # one per mailbox
    assert len(stub.requests) == 2
    other = json.loads(key_file.read_text())
    other["private_key"] = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    key_file.write_text(json.dumps(other))
    with pytest.raises(ProbeError) as err:
        token_source(OAuthSettings(kind="google_service_account", key_file=key_file)).token("a@x")
    assert err.value.reason == "token" and "bad signature" in err.value.detail


def test_ms_client_credentials_with_a_configurable_authority(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    def handle(method: str, path: str, form: dict[str, str]) -> tuple[int, Any]:
        base = f"{stub.url}/tenant-1"
        if method == "GET":
            assert path.startswith("/tenant-1/v2.0/.well-known/openid-configuration")
            return 200, {"token_endpoint": f"{base}/oauth2/v2.0/token", "issuer": f"{base}/v2.0",
                         "authorization_endpoint": f"{base}/oauth2/v2.0/authorize"}  # fmt: skip
        assert path == "/tenant-1/oauth2/v2.0/token" and form["grant_type"] == "client_credentials"
        if form.get("client_secret") != "s3cret":
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: bad secret",
            }
        assert form["client_id"] == "app-1"
        assert form["scope"] == "https://outlook.office365.com/.default"  # the IMAP scope
        return 200, {"access_token": "ms-app-token", "expires_in": 3600, "token_type": "Bearer"}

    stub = Stub(ca, handle)
    try:
        settings = OAuthSettings(
            kind="ms_client_credentials", tenant_id="tenant-1", client_id="app-1",
            client_secret_env="RELAY_TEST_MS_SECRET", authority=stub.url,
        )  # fmt: skip
        monkeypatch.setenv("RELAY_TEST_MS_SECRET", "s3cret")
        source = token_source(settings)
        assert source.token("ann@example.com") == "ms-app-token"
        assert source.token("ben@example.com") == "ms-app-token"  # an app token, cached by msal
        assert sum(1 for m, p, _ in stub.requests if m == "POST") == 1
        monkeypatch.setenv("RELAY_TEST_MS_SECRET", "wrong")
        with pytest.raises(ProbeError) as err:
            token_source(settings).token("ann@example.com")
        assert err.value.reason == "token" and "AADSTS7000215" in err.value.detail
    finally:
        stub.close()


def test_command_token(tmp_path: Path) -> None:
    assert (
        CommandToken(f"{sys.executable} -c 'import sys; print(sys.argv[1])' {{user}}").token(
            "o'brien@example.com"
        )
        == "o'brien@example.com"
    )  # {user} is shell-quoted
    with pytest.raises(ProbeError) as err:
        CommandToken(f"{sys.executable} -c 'import sys; sys.exit(\"expired\")'").token("a@x")
    assert err.value.reason == "token" and "expired" in err.value.detail


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.realservers
@pytest.mark.skipif(dovecot_mod.available() is None, reason="dovecot is not installed")
def test_xoauth2_end_to_end_against_dovecots_oauth2_passdb(
    google: tuple[Stub, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relay probe check` logs in with XOAUTH2: a command's token, then a service account's."""
    _, key_file = google

    def introspect(method: str, path: str, form: dict[str, str]) -> tuple[int, Any]:
        token = form.get("token", "")
        user = {"cmd-token": "ann@example.com"}.get(token) or token.removeprefix("g-")
        return 200, {"active": token == "cmd-token" or token.startswith("g-"), "username": user}

    introspection = Stub(None, introspect)
    store = dovecot_mod.Dovecot(
        name="oauth", oauth_introspection_url=f"{introspection.url}/introspect"
    )
    try:
        store.start()
        folder = tmp_path / "cfg"
        folder.mkdir()
        (folder / "pilot-users.yaml").write_text(PILOTS)
        good = f"{sys.executable} -c 'print(\"cmd-token\")'"
        providers = {
            "legacy": f"{{host: 127.0.0.1, port: {store.imap_port}, tls: none, auth: xoauth2, "
            f"oauth: {{kind: command, command: {json.dumps(good)}}}}}",
            "new": f"{{host: 127.0.0.1, port: {store.imap_port}, tls: none, auth: xoauth2, "
            f"oauth: {{kind: google_service_account, key_file: {key_file}}}}}",
        }
        cfg = folder / "relay.yaml"
        cfg.write_text(probe_yaml(2601, 2602, providers))
        res = CliRunner().invoke(cli, ["probe", "check", "-c", str(cfg)])
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert (
            lines[0].startswith("legacy: ok 127.0.0.1:")
            and "login ann@example.com (xoauth2)" in lines[0]
        )
        assert "junk Junk (SPECIAL-USE)" in lines[0]
        assert lines[1].startswith("new: ok") and "login ann@example-new.com (xoauth2)" in lines[1]
        assert "method=XOAUTH2" in store.log()
        assert [f["token"] for m, _, f in introspection.requests] == [
            "cmd-token",
            "g-ann@example-new.com",
        ]

        bad = f"{sys.executable} -c 'print(\"stale\")'"
        cfg.write_text(
            probe_yaml(
                2601,
                2602,
                {"legacy": providers["legacy"].replace(json.dumps(good), json.dumps(bad))},
            )
        )
        res = CliRunner().invoke(cli, ["probe", "check", "-c", str(cfg)])
        assert res.exit_code == 1
        assert res.output.startswith("legacy: FAILED") and "login: " in res.output
        assert "AUTHENTICATIONFAILED" in res.output
    finally:
        store.close()
        introspection.close()
