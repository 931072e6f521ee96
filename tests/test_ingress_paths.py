"""The ingress's fast path for MAIL/RCPT paths gives what aiosmtpd's own parser gives."""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ingress._aiosmtpd import AiosmtpdSMTP


def _server(limit: int) -> AiosmtpdSMTP:
    """Just enough of a server for `_getaddr`, which reads only `local_part_limit`."""
    server = AiosmtpdSMTP.__new__(AiosmtpdSMTP)
    server.local_part_limit = limit
    return server


def _outcome(parse: Any, arg: str, limit: int) -> Any:
    try:
        return parse(_server(limit), arg)
    except Exception as exc:  # aiosmtpd's parser raises on a few inputs ("<"): so must ours
        return type(exc)


def ours(arg: str, limit: int = 0) -> Any:
    return _outcome(AiosmtpdSMTP._getaddr, arg, limit)


def theirs(arg: str, limit: int = 0) -> Any:
    return _outcome(SMTP._getaddr, arg, limit)


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
