"""Shared fixtures: config files in a temp folder, free ports, the relay process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

PILOTS = """\
new_domains:
  example.com: example-new.com
  dev.example.com: dev.example-new.com
pilots:
  - address: alice@example.com
    group: sales
  - address: bob@example.com
    group: support
    mode: new-only
    new_address: robert@example-new.com
  - address: "*@dev.example.com"
    group: dev
  - address: carol@example.com
    group: marketing
    cutover_at: 2031-03-01T18:00:00+01:00
  - address: dave@example.com
    group: support
    mode: legacy-only
"""


def write_config(folder: Path, relay: str = "", pilots: str = PILOTS) -> Path:
    """A relay.yaml (SPEC defaults unless overridden) and its pilot file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pilot-users.yaml").write_text(pilots)
    cfg = folder / "relay.yaml"
    cfg.write_text(textwrap.dedent(relay) if relay else "domains: [example.com, dev.example.com]\n")
    return cfg


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "config"
