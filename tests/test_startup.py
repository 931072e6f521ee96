"""Starting and operating `relay serve` as an operator sees it (SPEC Part 2 "Listening").

Each startup failure is one line `relay: WHAT: WHY` on stderr and exit 1,
never a traceback; duplicate YAML keys are `PATH:LINE: KEY: duplicate key`;
the secrets are needed by `relay serve` only.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from relay.cli import cli
from tests.conftest import PILOTS, RelayEnv, write_config
from tests.harness import free_port, relay_settings

pytestmark = pytest.mark.timeout(60)

# Tests run as root, and root ignores file modes: drop the two capabilities that
# let it, so a read-only directory refuses root as it refuses the service user.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []  # fmt: skip


def relay_yaml(port: int, *overrides: str | dict[str, object]) -> str:
    """A relay.yaml for these tests, as text (written with write_config)."""
    dead = free_port()
    settings = relay_settings(dead, dead, {"listen": {"port": port}, "shutdown_timeout": 1},
                              *overrides)  # fmt: skip
    return yaml.safe_dump(settings)


def serve(cfg: Path, prefix: list[str] | None = None, timeout: float = 30) -> tuple[int, str]:
    res = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return res.returncode, res.stderr


def assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err, err
    failures = [ln for ln in err.splitlines() if ln.startswith("relay: ")]
    assert failures == [expected], err


def test_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "config", relay_yaml(port))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, err = serve(cfg)
    assert_one_line(code, err, f"relay: listen 127.0.0.1:{port}: Address already in use")
    assert "relay stopped" not in err


def test_spool_locked(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config", relay_yaml(free_port()))
    spool = tmp_path / "var" / "spool"
    (spool / "queue").mkdir(parents=True)
    with open(spool / "relay.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running relay holds it
        code, err = serve(cfg)
    assert_one_line(code, err, f"relay: spool {spool}: in use by another relay")


@pytest.mark.parametrize(
    ("readonly", "what"),
    [("var", "spool {tmp}/var/spool"), ("log", "delivery log {tmp}/log/deliveries.jsonl")],
    ids=["spool", "log"],
)
def test_permission_denied(tmp_path: Path, readonly: str, what: str) -> None:
    folder = tmp_path / readonly
    folder.mkdir()
    cfg = write_config(
        tmp_path / "config", relay_yaml(free_port(), {"log": "../log/deliveries.jsonl"})
    )
    (tmp_path / "log").mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        code, err = serve(cfg, NO_DAC)
    finally:
        folder.chmod(0o755)
    assert_one_line(code, err, f"relay: {what.format(tmp=tmp_path)}: Permission denied")


def test_pid_file_in_missing_directory(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config", relay_yaml(free_port(), "pid_file: ../run/r.pid\n"))
    code, err = serve(cfg)
    assert_one_line(
        code, err, f"relay: pid_file {tmp_path / 'run' / 'r.pid'}: No such file or directory"
    )
    assert not (tmp_path / "run").exists()


def _wait_for(predicate, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_pid_file_written_when_listening_and_removed_at_exit(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "config", relay_yaml(port, "pid_file: ../relay.pid\n"))
    pid_file = tmp_path / "relay.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for(pid_file.exists)
        assert pid_file.read_text() == f"{proc.pid}\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).startswith(b"220 ")  # written only once the listener is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not pid_file.exists()


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0
    assert res.output.startswith("relay 0.")


def test_config_defaults_to_env_then_etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "config", relay_yaml(2525))
    monkeypatch.setenv("RELAY_CONFIG", str(cfg))
    res = CliRunner().invoke(cli, ["route", "alice@example.com"])
    assert res.exit_code == 0, res.output
    assert "alice@example-new.com" in res.output
    monkeypatch.delenv("RELAY_CONFIG")
    if not Path("/etc/relay/relay.yaml").exists():
        res = CliRunner().invoke(cli, ["route", "alice@example.com"])
        assert res.exit_code == 1
        assert "/etc/relay/relay.yaml: file not found" in res.output


@pytest.mark.parametrize(
    ("relay", "pilots", "expected"),
    [
        (
            "domains: [example.com, dev.example.com]\nlimits:\n  max_hops: 5\n  max_hops: 7\n",
            PILOTS,
            "config/relay.yaml:4: limits.max_hops: duplicate key",
        ),
        (
            "domains: [example.com]\n",
            "new_domains: {example.com: example-new.com}\npilots:\n"
            "  - address: a@example.com\npilots:\n  - address: b@example.com\n",
            "config/pilot-users.yaml:4: pilots: duplicate key",
        ),
    ],
    ids=["relay.yaml", "pilot-users.yaml"],
)
def test_duplicate_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relay: str, pilots: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "config", relay, pilots)
    res = CliRunner().invoke(cli, ["check", "-c", "config/relay.yaml"])
    assert res.exit_code == 1
    assert expected in res.output.splitlines(), res.output


SECRET_YAML = "providers:\n  legacy:\n    username: relay\n    password_env: RELAY_TEST_UNSET_PW\n"


def test_secrets_needed_by_serve_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_TEST_UNSET_PW", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "config", relay_yaml(free_port(), SECRET_YAML))
    line = cfg.read_text().splitlines().index("    password_env: RELAY_TEST_UNSET_PW") + 1
    runner = CliRunner()
    res = runner.invoke(cli, ["check", "-c", "config/relay.yaml"])
    assert res.exit_code == 0, res.output
    assert (
        f"warning: config/relay.yaml:{line}: providers.legacy.password_env: environment variable "
        "RELAY_TEST_UNSET_PW is not set (needed by relay serve)" in res.output
    )
    for args in (["queue", "list"], ["route", "alice@example.com"], ["queue", "retry"]):
        res = runner.invoke(cli, [*args, "-c", "config/relay.yaml"])
        assert res.exit_code == 0, (args, res.output)
        assert "RELAY_TEST_UNSET_PW" not in res.output
    code, err = serve(Path("config/relay.yaml"))
    assert code == 1 and "Traceback" not in err
    assert (
        f"config/relay.yaml:{line}: providers.legacy.password_env: environment variable "
        "RELAY_TEST_UNSET_PW is not set" in err.splitlines()
    )


def test_unknown_queue_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "config", relay_yaml(free_port()))
    for op in ("retry", "delete"):
        res = CliRunner().invoke(cli, ["queue", op, "NOSUCHID", "-c", "config/relay.yaml"])
        assert res.exit_code == 1, res.output
        assert "error: NOSUCHID: not in the queue" in res.output


async def test_unknown_queue_id_with_running_relay(relay_env) -> None:  # type: ignore[no-untyped-def]
    env: RelayEnv = await relay_env()
    for op in ("retry", "delete"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "queue", op, "NOSUCHID", "-c", str(env.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, out
        assert b"error: NOSUCHID: not in the queue" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs its override dropped")
def test_setpriv_really_drops_root_override(tmp_path: Path) -> None:
    """The permission tests above mean something only if root is refused like a user."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    res = subprocess.run([*NO_DAC, "touch", str(ro / "x")], capture_output=True, timeout=10)
    ro.chmod(0o755)
    assert res.returncode != 0 and not (ro / "x").exists()
