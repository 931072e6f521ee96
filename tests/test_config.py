"""`relay check`: every error of SPEC "Routing" with its PATH:LINE: prefix and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay import config
from relay.cli import cli
from tests.conftest import PILOTS, write_config

HEAD = "new_domains:\n  example.com: example-new.com\npilots:\n"


def run_check(cfg: Path) -> tuple[int, str]:
    # run from the config folder's parent so PATH is shown relative, as an operator types it
    res = CliRunner().invoke(cli, ["check", "-c", os.path.relpath(cfg)])
    return res.exit_code, res.output


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("entries", "line", "key", "fragment"),
    [
        ("  - address: eve@elsewhere.org\n", 4, "pilots.0.address", "not in domains"),
        (
            "  - address: a@example.com\n  - address: A@Example.com\n",
            5,
            "pilots.1.address",
            "duplicate of the entry on line 4",
        ),
        (
            '  - address: "*@example.com"\n    new_address: x@example-new.com\n',
            5,
            "pilots.0.new_address",
            "wildcard",
        ),
        ("  - address: x@dev.example.com\n", 4, "pilots.0.address", "no new address"),
        (
            "  - address: a@example.com\n    cutover_at: 2031-03-01T18:00:00\n",
            5,
            "pilots.0.cutover_at",
            "UTC offset",
        ),
        (
            "  - address: a@example.com\n    mode: new-only\n"
            "    cutover_at: 2031-03-01T18:00:00Z\n",
            6,
            "pilots.0.cutover_at",
            "only allowed with mode dual",
        ),
        ("  - address: a@example.com\n    mode: shadow\n", 5, "pilots.0.mode", "unknown value"),
    ],
    ids=[
        "outside-domains",
        "duplicate",
        "new-address-on-wildcard",
        "no-new-domain",
        "cutover-naive",
        "cutover-not-dual",
        "unknown-mode",
    ],
)
def test_each_check_error(
    config_dir: Path, entries: str, line: int, key: str, fragment: str
) -> None:
    cfg = write_config(config_dir, pilots=HEAD + entries)
    code, out = run_check(cfg)
    assert code == 1
    prefix = f"config/pilot-users.yaml:{line}: {key}: "
    lines = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    assert lines and fragment in lines[0], out


def test_all_errors_reported_at_once(config_dir: Path) -> None:
    entries = "  - address: eve@elsewhere.org\n  - address: b@example.com\n    mode: bogus\n"
    cfg = write_config(config_dir, pilots=HEAD + entries)
    code, out = run_check(cfg)
    assert code == 1
    assert "config/pilot-users.yaml:4: pilots.0.address:" in out
    assert "config/pilot-users.yaml:6: pilots.1.mode:" in out


def test_relay_yaml_unknown_key_and_bad_value(config_dir: Path) -> None:
    cfg = write_config(
        config_dir,
        relay="domains: [example.com]\nlisten:\n  port: 2525\n"
        "  colour: red\nproviders:\n  legacy:\n    tls: maybe\n",
    )
    code, out = run_check(cfg)
    assert code == 1
    assert "config/relay.yaml:4: listen.colour: unknown key" in out
    assert "config/relay.yaml:7: providers.legacy.tls: unknown value 'maybe'" in out


def test_missing_files(config_dir: Path) -> None:
    code, out = run_check(config_dir / "nope.yaml")
    assert (code, out.strip()) == (1, "config/nope.yaml: file not found")
    cfg = write_config(config_dir)
    (config_dir / "pilot-users.yaml").unlink()
    code, out = run_check(cfg)
    assert (code, out.strip()) == (1, "config/pilot-users.yaml: file not found")


def test_missing_password_env_is_a_warning(config_dir: Path) -> None:
    """SPEC Part 2: only `relay serve` needs the secret (tests/test_startup.py)."""
    cfg = write_config(
        config_dir,
        relay="domains: [example.com, dev.example.com]\nproviders:\n"
        "  new:\n    username: relay\n    password_env: RELAY_TEST_NO_SUCH_VAR\n",
    )
    code, out = run_check(cfg)
    assert code == 0
    assert "warning: config/relay.yaml:5: providers.new.password_env: environment variable" in out


def test_valid_config_prints_table_and_warns_without_bounce(config_dir: Path) -> None:
    cfg = write_config(config_dir)
    code, out = run_check(cfg)
    assert code == 0, out
    assert "bob@example.com" in out and "robert@example-new.com" in out
    assert "warning: config/relay.yaml:1: bounce: not set" in out


def test_defaults_and_relative_paths(config_dir: Path) -> None:
    cfg = config.load(write_config(config_dir))
    r = cfg.relay
    assert r.listen.port == 2525 and r.limits.max_hops == 100
    assert r.retry.schedule == (60, 300, 900, 3600) and r.retry.max_age == 432000
    assert r.providers.legacy.port == 2601 and r.providers.new.port == 2602
    assert r.spool == (config_dir / "../var/spool").resolve()
    assert r.log == (config_dir / "../var/deliveries.jsonl").resolve()


def test_settings_are_frozen(config_dir: Path) -> None:
    cfg = config.load(write_config(config_dir))
    with pytest.raises(Exception, match="frozen"):
        cfg.relay.limits.max_hops = 5  # type: ignore[misc]


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", "config/relay.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert PILOTS  # the fixture file mirrors the shipped one plus a legacy-only entry


def test_workers_auto_is_the_default_one_per_usable_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shipped default uses every CPU the process may run on (its affinity mask),
    capped; a relay on port 0 (tests, the demo) has no port to share and runs one."""
    base = {"domains": ["example.com"]}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert config.RelaySettings.model_validate(base).workers == 3
    assert config.RelaySettings.model_validate({**base, "workers": "auto"}).workers == 3
    assert config.RelaySettings.model_validate({**base, "listen": {"port": 0}}).workers == 1
    assert config.RelaySettings.model_validate({**base, "workers": 2}).workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert config.RelaySettings.model_validate(base).workers == config.AUTO_WORKERS_MAX
    with pytest.raises(ValueError, match="workers"):
        config.RelaySettings.model_validate({**base, "workers": "many"})
