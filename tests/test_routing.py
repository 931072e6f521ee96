"""SPEC "Routing": one table row per rule, plus properties over generated addresses."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import config
from relay.routing import PilotTable, resolve_recipient, route
from tests.conftest import write_config

BEFORE = datetime(2030, 1, 1, tzinfo=UTC)
AFTER = datetime(2031, 3, 1, 17, 0, tzinfo=UTC)  # 18:00+01:00 == 17:00Z: cutover instant


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    return config.load(write_config(tmp_path_factory.mktemp("routing")))


@pytest.fixture(scope="module")
def table(cfg: config.Config) -> PilotTable:
    return PilotTable.build(cfg.pilots, cfg.relay)


L, N = "legacy", "new"
ROWS = [
    # (recipient, forwarded, now, expected [(provider, delivered_to, role)], entry)
    ("zed@example.com", False, BEFORE, [(L, "zed@example.com", "primary")], None),
    (
        "alice@example.com",
        False,
        BEFORE,
        [(L, "alice@example.com", "primary"), (N, "alice@example-new.com", "shadow")],
        "alice@example.com",
    ),
    (
        "bob@example.com",
        False,
        BEFORE,
        [(N, "robert@example-new.com", "primary")],
        "bob@example.com",
    ),
    ("dave@example.com", False, BEFORE, [(L, "dave@example.com", "primary")], "dave@example.com"),
    (
        "alice@example.com",
        True,
        BEFORE,
        [(N, "alice@example-new.com", "shadow")],
        "alice@example.com",
    ),
    ("bob@example.com", True, BEFORE, [(N, "robert@example-new.com", "shadow")], "bob@example.com"),
    ("zed@example.com", True, BEFORE, [], None),
    ("dave@example.com", True, BEFORE, [], "dave@example.com"),
    # case: full address case-insensitive, local part kept, domain lowercased
    (
        "Alice@EXAMPLE.com",
        False,
        BEFORE,
        [(L, "Alice@example.com", "primary"), (N, "Alice@example-new.com", "shadow")],
        "alice@example.com",
    ),
    # subaddress: tag kept on both sides, also with new_address
    (
        "alice+x@Example.COM",
        False,
        BEFORE,
        [(L, "alice+x@example.com", "primary"), (N, "alice+x@example-new.com", "shadow")],
        "alice@example.com",
    ),
    (
        "bob+tag@example.com",
        False,
        BEFORE,
        [(N, "robert+tag@example-new.com", "primary")],
        "bob@example.com",
    ),
    # wildcard: exact domain only, not subdomains
    (
        "anyone@dev.example.com",
        False,
        BEFORE,
        [(L, "anyone@dev.example.com", "primary"), (N, "anyone@dev.example-new.com", "shadow")],
        "*@dev.example.com",
    ),
    ("anyone@x.dev.example.com", False, BEFORE, [(L, "anyone@x.dev.example.com", "primary")], None),
    # cutover_at: dual before, new-only from the instant on
    (
        "carol@example.com",
        False,
        BEFORE,
        [(L, "carol@example.com", "primary"), (N, "carol@example-new.com", "shadow")],
        "carol@example.com",
    ),
    (
        "carol@example.com",
        False,
        AFTER,
        [(N, "carol@example-new.com", "primary")],
        "carol@example.com",
    ),
    # postmaster without a domain: the first of domains
    ("postmaster", False, BEFORE, [(L, "postmaster@example.com", "primary")], None),
]


@pytest.mark.parametrize(("rcpt", "fwd", "now", "expected", "entry"), ROWS)
def test_routing_table(
    table: PilotTable,
    rcpt: str,
    fwd: bool,
    now: datetime,
    expected: list[tuple[str, str, str]],
    entry: str | None,
) -> None:
    r = route(rcpt, table, now, fwd)
    assert [(d.provider, d.delivered_to, d.role) for d in r.deliveries] == expected
    assert r.entry == entry


def test_exact_beats_wildcard(tmp_path: Path) -> None:
    pilots = (
        "new_domains:\n  example.com: example-new.com\npilots:\n"
        '  - address: "*@example.com"\n    group: all\n'
        "  - address: vip@example.com\n    group: vip\n    mode: legacy-only\n"
    )
    cfg = config.load(write_config(tmp_path, pilots=pilots))
    t = PilotTable.build(cfg.pilots, cfg.relay)
    assert [d.group for d in route("vip@example.com", t, BEFORE).deliveries] == ["vip"]
    assert [d.group for d in route("x@example.com", t, BEFORE).deliveries] == ["all", "all"]


def test_cutover_boundary_is_inclusive(table: PilotTable) -> None:
    just_before = datetime(2031, 3, 1, 16, 59, 59, 999999, tzinfo=UTC)
    assert route("carol@example.com", table, just_before).deliveries[0].mode == "dual"
    assert route("carol@example.com", table, AFTER).deliveries[0].mode == "new-only"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("u@Example.COM", ("u@example.com", False)),
        ("u@elsewhere.org", None),
        ("u%elsewhere.org@example.com", None),
        ("elsewhere.org!u@example.com", None),
        ('"u@elsewhere.org"@example.com', None),
        ("u@[127.0.0.1]", None),
        ("u@sub.example.com", None),
        ("u@xn--exmple-cua.com", None),
        ("u@exаmple.com", None),  # Cyrillic а
        ("postmaster", ("postmaster@example.com", False)),
    ],
)
def test_resolve_recipient_refuses_relay_tricks(
    cfg: config.Config, address: str, expected: tuple[str, bool] | None
) -> None:
    assert resolve_recipient(address, cfg.relay) == expected


def test_forward_domain_maps_back(tmp_path: Path) -> None:
    cfg = config.load(
        write_config(
            tmp_path,
            relay="domains: [example.com, dev.example.com]\n"
            "forward_domains: {fwd.example.com: example.com}\n",
        )
    )
    assert resolve_recipient("Alice@FWD.example.com", cfg.relay) == ("Alice@example.com", True)


local_parts = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}(\+[a-z0-9]{1,5})?", fullmatch=True)
names = st.sampled_from(["alice", "bob", "carol", "dave", "zed", "Alice", "BOB"])
recipients = st.one_of(
    st.tuples(local_parts, st.sampled_from(["example.com", "dev.example.com", "EXAMPLE.com"])),
    st.tuples(
        st.builds(lambda n, t: n + t, names, st.sampled_from(["", "+x", "+a.b"])),
        st.sampled_from(["example.com", "Example.Com"]),
    ),
).map(lambda t: f"{t[0]}@{t[1]}")
instants = st.sampled_from([BEFORE, AFTER])


@settings(max_examples=300, deadline=None)
@given(rcpt=recipients, now=instants)
def test_property_one_primary(table: PilotTable, rcpt: str, now: datetime) -> None:
    deliveries = route(rcpt, table, now).deliveries
    assert sum(d.role == "primary" for d in deliveries) == 1
    assert len({d.provider for d in deliveries}) == len(deliveries)


@settings(max_examples=300, deadline=None)
@given(rcpt=recipients, now=instants)
def test_property_forwarded_at_most_one_new_shadow(
    table: PilotTable, rcpt: str, now: datetime
) -> None:
    deliveries = route(rcpt, table, now, forwarded=True).deliveries
    assert len(deliveries) <= 1
    assert all(d.provider == "new" and d.role == "shadow" for d in deliveries)


@settings(max_examples=300, deadline=None)
@given(rcpt=recipients, now=instants, fwd=st.booleans())
def test_property_new_address(table: PilotTable, rcpt: str, now: datetime, fwd: bool) -> None:
    local, _, domain = rcpt.rpartition("@")
    domain = domain.lower()
    base, plus, tag = local.partition("+")
    tag = plus + tag
    for d in route(rcpt, table, now, fwd).deliveries:
        if d.provider == "new":
            if base.lower() == "bob":
                assert d.delivered_to == f"robert{tag}@example-new.com"
            else:
                assert d.delivered_to == f"{local}@{table.new_domains[domain]}"
        else:
            assert d.delivered_to == f"{local}@{domain}"


ROOT = Path(__file__).resolve().parent.parent


def run_route(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from relay.cli import cli

    res = CliRunner().invoke(cli, ["route", "-c", str(ROOT / "config/relay.yaml"), *args])
    return res.exit_code, res.output


def test_route_command_on_the_shipped_config() -> None:
    code, out = run_route("alice+x@Example.COM")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "recipient alice+x@example.com: decided by entry alice@example.com"
    assert lines[1].split()[:3] == ["legacy", "alice+x@example.com", "primary"]
    assert lines[2].split()[:3] == ["new", "alice+x@example-new.com", "shadow"]


def test_route_command_json_at_and_forwarded() -> None:
    import json

    code, out = run_route("carol@example.com", "--at", "2031-03-01T17:00:00Z", "--json")
    route_ = json.loads(out)
    assert code == 0 and route_["entry"] == "carol@example.com"
    assert [(d["provider"], d["role"], d["mode"]) for d in route_["deliveries"]] == [
        ("new", "primary", "new-only")
    ]
    code, out = run_route("zed@example.com", "--forwarded")
    assert code == 0 and "discarded: legacy already holds the original" in out
    code, out = run_route("someone@elsewhere.org")
    assert (code, out.strip()) == (1, "someone@elsewhere.org: refused: 550 5.7.1 Relaying denied")
