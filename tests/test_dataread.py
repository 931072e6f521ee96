"""The streaming DATA parser: terminator, smuggling, dot-unstuffing, newlines, limits."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ingress.dataread import DataError, DataParser

pytestmark = pytest.mark.timeout(30)
MAX_LINE = 1000


def parser(**kw: object) -> DataParser:
    args: dict[str, object] = {"max_size": 10**9, "max_line_length": MAX_LINE, "reject_bare": False}
    args.update(kw)
    return DataParser(**args)  # type: ignore[arg-type]


def run(chunks: list[bytes], **kw: object) -> tuple[DataParser, bytes]:
    """Feed chunks until the end of data; `p.rest` also gets the chunks left unfed."""
    p = parser(**kw)
    out = b""
    for i, c in enumerate(chunks):
        out += p.feed(c)
        if p.done:
            p.rest += b"".join(chunks[i + 1 :])
            break
    return p, out


def splits(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- the end of data -------------------------------------------------------------

MESSAGE = b"Subject: t\r\n\r\nline one\r\n..stuffed\r\nlast\r\n"
WIRE = MESSAGE + b".\r\nQUIT\r\n"
CONTENT = b"Subject: t\r\n\r\nline one\r\n.stuffed\r\nlast\r\n"


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_terminator_split_at_every_offset(cut: int) -> None:
    p, out = run(splits(WIRE, cut))
    assert p.done and p.error is None
    assert out == CONTENT
    assert p.rest == b"QUIT\r\n"
    assert p.size == len(MESSAGE)


@pytest.mark.parametrize("first", range(1, len(WIRE) - 1))
def test_terminator_split_in_three(first: int) -> None:
    for second in range(first + 1, len(WIRE)):
        p, out = run(splits(WIRE, first, second))
        assert (p.done, out, p.rest, p.size) == (True, CONTENT, b"QUIT\r\n", len(MESSAGE))


def test_terminator_byte_by_byte() -> None:
    p = parser()
    out = b""
    fed = 0
    for i in range(len(WIRE)):
        out += p.feed(WIRE[i : i + 1])
        fed += 1
        if p.done:
            break
    assert p.done and out == CONTENT and p.size == len(MESSAGE)
    assert fed == len(MESSAGE) + 3  # stops right after ".\r\n"; the rest stays unread


def test_empty_message() -> None:
    p, out = run([b".\r\n"])
    assert p.done and out == b"" and p.size == 0 and p.rest == b""


def test_pipelined_commands_after_the_dot_are_returned() -> None:
    p, out = run([b"a\r\n.\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@example.com>\r\n"])
    assert out == b"a\r\n"
    assert p.rest == b"MAIL FROM:<x@y>\r\nRCPT TO:<z@example.com>\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\r\n",  # bare LF before the dot (the classic SMTP smuggling)
        b"\r\n.\n",  # bare LF after the dot
        b"\n.\n",
        b"\r.\r\n",  # bare CR before the dot
        b"\r\n.\r",  # bare CR after, then a normal line
        b"\r\n.\r\r\n",
    ],
)
@pytest.mark.parametrize("reject_bare", [False, True])
def test_only_crlf_dot_crlf_ends_data(smuggle: bytes, reject_bare: bool) -> None:
    wire = b"x" + smuggle + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\n"
    wire += b"smuggled\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(wire)):
        p, out = run(splits(wire, cut), reject_bare=reject_bare)
        assert p.done and p.rest == b"QUIT\r\n", cut  # the data ends at the real terminator only
        if reject_bare:
            assert p.error is DataError.BARE_NEWLINE and b"MAIL" not in out
        else:
            assert p.error is None
            assert b"MAIL FROM:<evil@x>\r\n" in out  # stored as content, never run as commands


def test_dot_after_overlong_line_does_not_end_data() -> None:
    # An over-long line is dropped while it streams; its last "." must not pass
    # for a line of its own when the CRLF follows in the next read.
    wire = [b"ok\r\n", b"a" * (MAX_LINE * 3) + b".", b"\r\nMAIL FROM:<evil@x>\r\n.\r\nQUIT\r\n"]
    p, out = run(wire)
    assert p.done and p.error is DataError.LINE_TOO_LONG
    assert p.rest == b"QUIT\r\n"
    assert out == b"ok\r\n"


# -- transparency and newlines -----------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..\r\n", b".\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..x\r\n", b".x\r\n"),
        (b"a.b\r\n.a\r\n", b"a.b\r\na\r\n"),  # a lone leading dot from a sloppy client goes
        (b"x\r\n..\r\n..\r\n", b"x\r\n.\r\n.\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, content: bytes) -> None:
    p, out = run([wire + b".\r\n"])
    assert p.done and p.error is None and out == content
    assert p.size == len(wire)


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"a\n\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n..b\r\n", b"a\r\n.b\r\n"),  # a bare-LF line is a line: unstuffed too
    ],
)
def test_bare_newlines_normalize_to_crlf(wire: bytes, content: bytes) -> None:
    for cut in range(1, len(wire) + 3):
        p, out = run(splits(wire + b".\r\n", cut))
        assert p.done and p.error is None and out == content, cut


@pytest.mark.parametrize("wire", [b"a\nb\r\n", b"a\rb\r\n", b"ok\r\nlast\n"])
def test_bare_newlines_rejected_when_configured(wire: bytes) -> None:
    p, out = run([wire, b"more\r\n.\r\n"], reject_bare=True)
    assert p.done and p.error is DataError.BARE_NEWLINE
    assert out == b"" or out == b"ok\r\n"  # nothing after the error is returned


# -- limits ---------------------------------------------------------------------------


def test_line_length_limit_counts_the_crlf() -> None:
    exact = b"x" * (MAX_LINE - 2) + b"\r\n"
    p, out = run([exact + b".\r\n"])
    assert p.error is None and out == exact
    over = b"x" * (MAX_LINE - 1) + b"\r\n"
    p, out = run([over + b".\r\n"])
    assert p.done and p.error is DataError.LINE_TOO_LONG and out == b""


def test_stuffed_dot_does_not_count_against_the_line_limit() -> None:
    line = b"." + b"x" * (MAX_LINE - 3) + b"\r\n"  # MAX_LINE octets, MAX_LINE + 1 stuffed
    p, out = run([b"." + line + b".\r\n"])
    assert p.error is None and out == line
    p, out = run([b".." + line + b".\r\n"])
    assert p.error is DataError.LINE_TOO_LONG


@pytest.mark.parametrize("chunk", [1, 3, 64, MAX_LINE - 1, MAX_LINE + 1, 5000])
def test_long_line_detected_across_chunks_and_reading_goes_on(chunk: int) -> None:
    wire = b"head\r\n" + b"y" * (MAX_LINE * 5) + b"\r\nafter\r\n.\r\nNOOP\r\n"
    p, out = run([wire[i : i + chunk] for i in range(0, len(wire), chunk)])
    assert p.done and p.error is DataError.LINE_TOO_LONG
    assert p.rest == b"NOOP\r\n"
    assert b"y" not in out and b"after" not in out  # nothing stored after the error


def test_long_lines_up_to_the_limit_pass_through_unchanged() -> None:
    big = 65536
    line = b"z" * (big - 2) + b"\r\n"
    wire = line * 3 + b"short\r\n"
    p = parser(max_line_length=big)
    out = b""
    for i in range(0, len(wire), 10_000):
        out += p.feed(wire[i : i + 10_000])
    out += p.feed(b".\r\n")
    assert p.done and p.error is None and out == wire


@pytest.mark.parametrize("cut", range(1, 8))
def test_size_counts_octets_as_received(cut: int) -> None:
    wire = b"ab\r\n..c\r\n"  # 10 octets, dot-stuffed
    p, out = run(splits(wire + b".\r\nX", len(wire) - 3 + cut))
    assert p.size == len(wire) and out == b"ab\r\n.c\r\n"


def test_message_exactly_at_the_size_limit_passes_however_split() -> None:
    wire = b"0123456\r\n" * 10
    for cut in range(len(wire) - 2, len(wire) + 3):
        p, out = run(splits(wire + b".\r\n", cut), max_size=len(wire))
        assert p.done and p.error is None and out == wire, cut


def test_over_the_size_limit_stops_storing_and_reads_to_the_end() -> None:
    line = b"x" * 98 + b"\r\n"
    p = parser(max_size=1000)
    stored = b""
    for _ in range(30):
        stored += p.feed(line)
    assert p.error is DataError.TOO_BIG
    assert len(stored) <= 1000 + len(line)
    assert not p.done
    p.feed(b".\r\nQUIT\r\n")
    assert p.done and p.rest == b"QUIT\r\n" and p.size == 3000


def test_feed_after_done_is_refused() -> None:
    p, _ = run([b".\r\n"])
    with pytest.raises(RuntimeError):
        p.feed(b"x")


# -- properties ------------------------------------------------------------------------

PIECES = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"x" * 40, b" "]


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    reject_bare=st.booleans(),
)
def test_any_chunking_gives_the_same_result(
    body: bytes, cuts: list[int], reject_bare: bool
) -> None:
    wire = body + b"\r\n.\r\nRSET\r\n"
    whole, whole_out = run([wire], reject_bare=reject_bare)
    assert whole.done
    chunks = [c for c in splits(wire, *(min(c, len(wire)) for c in cuts)) if c]
    p, out = run(chunks, reject_bare=reject_bare)
    assert p.done
    assert (p.error, p.size, p.rest) == (whole.error, whole.size, whole.rest)
    if whole.error is None:  # after an error what was returned is thrown away anyway
        assert out == whole_out
    # the end is the first CRLF.CRLF (or a "." line right at the start), nothing else
    end = 0 if wire.startswith(b".\r\n") else wire.find(b"\r\n.\r\n") + 2
    assert whole.size == end and whole.rest == wire[end + 3 :]
    if whole.error is None:
        assert out == reference(wire[:end])
    else:
        assert whole.error is DataError.BARE_NEWLINE and whole_out == b""


def reference(content: bytes) -> bytes:
    """What `normalize` stores: every LF or CR ends a line; a leading dot after LF goes."""
    lines = content.split(b"\n")[:-1] if content else []
    out = []
    for line in lines:
        body = line[:-1] if line.endswith(b"\r") else line
        parts = body.split(b"\r")
        if parts[0].startswith(b"."):
            parts[0] = parts[0][1:]
        out.extend(parts)
    return b"".join(p + b"\r\n" for p in out)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_has_long_line_agrees_with_splitting_into_lines(lengths: list[int], limit: int) -> None:
    from relay.ingress.dataread import has_long_line

    block = b"".join(b"x" * n + b"\n" for n in lengths)
    assert has_long_line(block, limit) == (max(lengths) + 1 > limit)


@pytest.mark.parametrize(
    ("wire", "dots"),
    [
        (b"a\r\nb\r\n.\r\n", False),
        (b"a\r\n..b\r\n.\r\n", True),
        (b"..a\r\n.\r\n", True),
        (b"a\r\n.b\r\n.\r\n", False),  # stored as "b": nothing to stuff
        (b"a\r.\r\nb\r\n.\r\n", True),  # the bare CR makes a stored "." line
        (b"a\n..\r\nb\r\n.\r\n", True),
    ],
)
def test_dot_lines_says_whether_the_egress_must_restuff(wire: bytes, dots: bool) -> None:
    p, out = run([wire])
    stored_dot_line = out.startswith(b".") or b"\n." in out
    assert p.done and p.dot_lines is dots is stored_dot_line, out


LINE_ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]


@settings(max_examples=500, deadline=None)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from([b"", b".", b".."]),
            st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            st.sampled_from(LINE_ENDS),
        ),
        max_size=40,
    ),
    reject_bare=st.booleans(),
)
def test_mostly_plain_blocks_give_the_reference(
    lines: list[tuple[bytes, bytes, bytes]], reject_bare: bool
) -> None:
    """Blocks of CRLF lines with a few bare CRs or LFs and dot lines among them, in one
    chunk: what the fast path must hand to the line-by-line path gets there."""
    body = b"".join(dot + text + end for dot, text, end in lines)
    if body.startswith(b".\r\n") or b"\r\n.\r\n" in body:
        return  # ends data early: covered above
    wire = b"x" + body + b"\r\n.\r\n"
    p, out = run([wire], reject_bare=reject_bare)
    assert p.done
    rest = body.replace(b"\r\n", b"")
    bare = b"\r" in rest or b"\n" in rest  # ("\r" then "\n" with nothing between is CRLF)
    if reject_bare and bare:
        assert p.error is DataError.BARE_NEWLINE
    else:
        assert p.error is None and out == reference(wire[: len(wire) - 3])
