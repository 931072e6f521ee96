"""The fast paths for plain mailboxes give what the libraries' own parsers give: the
ingress engine's MAIL/RCPT paths (as aiosmtpd's `_getaddr`) and egress quoting (aiosmtplib's)."""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from aiosmtplib.email import quote_address as aiosmtplib_quote
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery._aiosmtplib import quote_address
from relay.ingress.engine import parse_path


def _stock(limit: int) -> SMTP:
    """Just enough of aiosmtpd's server for `_getaddr`, which reads only `local_part_limit`."""
    server = SMTP.__new__(SMTP)
    server.local_part_limit = limit
    return server


def _outcome(parse: Any, arg: str) -> Any:
    try:
        return parse(arg)
    except Exception as exc:  # aiosmtpd's parser raises on a few inputs ("<"): so must ours
        return type(exc)


def ours(arg: str, limit: int = 0) -> Any:
    return _outcome(lambda a: parse_path(a, limit), arg)


def theirs(arg: str, limit: int = 0) -> Any:
    return _outcome(lambda a: SMTP._getaddr(_stock(limit), a), arg)


CASES = [
    "<alice@example.com>", " <alice@example.com>", "\t<alice@example.com>  SIZE=100",
    "<alice@example.com> SIZE=100 BODY=8BITMIME", "<alice@example.com>SIZE=1",
    "<a.b+tag@sub.example.com> NOTIFY=NEVER", "<a..b@example.com>", "<.a@example.com>",
    "<a.@example.com>", "<a@b..c>", "<a@-b.example>", "<a@[127.0.0.1]>", '<"a b"@example.com>',
    "<a@example.com> (comment) SIZE=1", "<a@example.com>(c)", "<>", "<a@example.com",
    "a@example.com", "<@relay.example:a@example.com>", "<a@exämple.com>", "<ä@example.com>",
    "<a@example.com> \t ", "<A!#$%&'*+/=?^_`{|}~-@EXAMPLE.COM>", "<a@b> <c@d>", "<",
]  # fmt: skip


@pytest.mark.parametrize("arg", CASES)
def test_same_answer_as_aiosmtpd(arg: str) -> None:
    assert ours(arg) == theirs(arg)


def test_local_part_limit_is_kept() -> None:
    arg = "<" + "a" * 65 + "@example.com>"
    assert ours(arg, 64) == theirs(arg, 64) == (None, None)
    assert ours(arg, 65) == theirs(arg, 65) == (arg[1:-1], "")


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet='ab.@<>()[] \t"+-=_1', max_size=30))
def test_same_answer_for_any_argument(arg: str) -> None:
    assert ours(arg) == theirs(arg)


@pytest.mark.parametrize(
    "address",
    ["", "alice@example.com", "a.b+c@sub.example.com", "A!#$%&'*+/=?^_`{|}~-@EXAMPLE.COM",
     '"a b"@example.com', "a..b@example.com", "ä@example.com", "a@[127.0.0.1]", "x"],
)  # fmt: skip
def test_egress_quoting_same_as_aiosmtplib(address: str) -> None:
    assert quote_address(address) == aiosmtplib_quote(address)


def test_egress_quoting_still_refuses_what_could_inject() -> None:
    with pytest.raises(ValueError, match="not permitted"):
        quote_address("a b@example.com")


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet='ab.@<>()[] \t"+-=_1\r\n', max_size=30))
def test_egress_quoting_same_for_any_address(address: str) -> None:
    assert _outcome(quote_address, address) == _outcome(aiosmtplib_quote, address)


def _replies(parse: Any, data: bytes) -> Any:
    """Every reply `parse` takes out of `data`, then what is left (or the error)."""
    from relay.delivery._aiosmtplib import Protocol

    proto = Protocol.__new__(Protocol)
    proto._buffer = bytearray(data)
    out: list[Any] = []
    try:
        while (reply := parse(proto)) is not None:
            out.append(tuple(reply))
    except Exception as exc:
        out.append(type(exc))
    return out, bytes(proto._buffer)


_LINE = st.one_of(
    st.sampled_from([b"250 Ok", b"250-first", b"354 go", b"250", b"25x bad", b"250 \xff\xfe",
                     b"421 4.3.0 bye  \t", b"2500 long", b"250 " + b"x" * 8200, b" 250 a"]),
    st.binary(max_size=12),
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\n", b""])), max_size=5))
def test_reply_parser_same_as_aiosmtplib(lines: list[tuple[bytes, bytes]]) -> None:
    from aiosmtplib.protocol import SMTPProtocol

    from relay.delivery._aiosmtplib import Protocol

    data = b"".join(a + b for a, b in lines)
    assert _replies(Protocol._read_response_from_buffer, data) == _replies(
        SMTPProtocol._read_response_from_buffer, data
    )
