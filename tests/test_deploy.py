"""The shipped deployment files: the container image, the systemd unit, logrotate.

The image is really built (contrib/docker/build-local.sh: a debootstrap base,
podman, chroot isolation) and run with buildah as its own non-root user, in
its own network namespace, where those tools exist; the config it ships is
checked everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config

ROOT = Path(__file__).resolve().parent.parent
IMAGE_CONFIG = ROOT / "contrib" / "docker" / "relay.yaml"


def test_image_config_puts_state_on_the_volumes_and_listens_everywhere() -> None:
    cfg = config.load(IMAGE_CONFIG)
    assert cfg.relay.spool == Path("/var/lib/relay/spool")
    assert cfg.relay.log == Path("/var/log/relay/deliveries.jsonl")
    assert cfg.relay.listen.host == "0.0.0.0" and cfg.relay.metrics.host == "0.0.0.0"
    res = subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(IMAGE_CONFIG)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_dockerfile_runs_as_relay_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER relay$", text, re.M)
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert 'CMD ["relay", "serve"]' in text and "RELAY_CONFIG=/etc/relay/relay.yaml" in text
    volumes = re.search(r"^VOLUME (.*)$", text, re.M)
    assert volumes and "/var/lib/relay" in volumes[1] and "/var/log/relay" in volumes[1]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "contrib" / "systemd" / "relay.service").read_text()
    for key in ("AmbientCapabilities=CAP_NET_BIND_SERVICE", "ProtectSystem=strict",
                "NoNewPrivileges=yes", "StateDirectory=relay", "LogsDirectory=relay",
                "ExecReload=/bin/kill -HUP $MAINPID", "User=relay"):  # fmt: skip
        assert key in unit.splitlines(), key
    # verify needs the executables it names: point them at this venv's relay
    relay_bin = Path(sys.executable).parent / "relay"
    assert relay_bin.exists()
    (tmp_path / "relay.service").write_text(unit.replace("/opt/relay/bin/relay", str(relay_bin)))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "relay.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # verify exits 0 even for an ignored bad line: any word about the unit is a failure
    assert res.returncode == 0 and "relay.service" not in res.stdout + res.stderr, (
        res.stdout + res.stderr
    )


def test_logrotate_snippet_signals_through_the_pid_file() -> None:
    text = (ROOT / "contrib" / "logrotate" / "relay").read_text()
    assert "/var/log/relay/deliveries.jsonl" in text
    assert 'kill -USR1 "$(cat /run/relay/relay.pid)"' in text
    if shutil.which("logrotate"):
        res = subprocess.run(
            ["logrotate", "-d", str(ROOT / "contrib" / "logrotate" / "relay")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "error" not in res.stderr.lower(), res.stderr


IMAGE_TOOLS = ("podman", "buildah", "debootstrap")


@pytest.fixture(scope="module")
def image() -> str:
    missing = [t for t in IMAGE_TOOLS if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"building the image needs root and {', '.join(missing) or 'root'}")
    res = subprocess.run(
        ["bash", str(ROOT / "contrib" / "docker" / "build-local.sh"), "localhost/relay:test"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def in_image(image: str, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh container of the image, as its USER, in its own network."""
    name = subprocess.run(
        ["buildah", "from", image], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--isolation=chroot", name, "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=60)


HEALTH = (
    'python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('
    "'http://127.0.0.1:9325/healthz', timeout=4).status != 200)\""
)
SEND = (
    "python3 -c \"import smtplib; s = smtplib.SMTP('127.0.0.1', 2525, timeout=10); "
    "print(s.sendmail('a@example.org', ['alice@example.com'], 'Subject: t\\r\\n\\r\\nx\\r\\n')); "
    's.quit()"'
)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_serves_as_shipped(image: str) -> None:
    """`docker run IMAGE`: the default command serves SMTP and /healthz, and drains on SIGTERM."""
    res = in_image(
        image,
        "id -un; relay serve & p=$!; "
        f"for i in $(seq 100); do {HEALTH} 2>/dev/null && break; sleep 0.1; done; "
        f"{HEALTH} && echo healthy; {SEND} && echo sent; "
        # workers: auto, as shipped: one spool per worker (spool/w<I>/) on a multi-CPU host
        "ls /var/lib/relay/spool/queue /var/lib/relay/spool/w*/queue 2>/dev/null | grep -c msg; "
        "kill -TERM $p; wait $p; echo exit=$?",
    )
    out = res.stdout.splitlines()
    assert out[0] == "relay", res.stdout + res.stderr
    assert "healthy" in out and "sent" in out and "exit=0" in out, res.stdout + res.stderr
    assert "1" in out  # queued on the volume (the stand-in providers are not there)
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_runs_the_demo(image: str) -> None:
    """`docker run IMAGE relay demo`: the work dir is writable by the image's user."""
    res = in_image(image, "relay demo --messages 20 >/dev/null && ls relay-demo")
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"deliveries.jsonl", "report.json", "report.html"} <= set(res.stdout.split())
