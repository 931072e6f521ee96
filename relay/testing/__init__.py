"""A scriptable loopback SMTP server that stands in for a mail provider.

Used by the test suite and by ``relay demo`` in place of the real providers
(legacy, new).  It records what it receives byte for byte and answers as its
:class:`Rule` list says: accept, defer (4xx), reject (5xx), hang (never answer)
or drop (close the connection without an answer), at any stage of the session.

It only ever listens on a loopback address.

Two ways to run it::

    async with Provider("legacy") as legacy:        # in a running event loop
        ...
        await legacy.wait_for_messages(1)

    with ProviderThread("new") as new:               # for synchronous callers
        ...                                          # (own loop, own thread)
        new.wait_for_messages(1)

Built on aiosmtpd's ``SMTP`` protocol with these changes: DATA is read by our
own reader (lines up to ``max_line_length`` pass and are recorded byte-exact,
nothing is decoded), replies carry enhanced status codes, the EHLO reply also
advertises PIPELINING and ENHANCEDSTATUSCODES, and a client that disconnects
abruptly produces no traceback.
"""

from relay.testing.clock import FakeClock
from relay.testing.provider import Provider, ProviderThread
from relay.testing.rules import ReceivedMessage, Rule

__all__ = [
    "FakeClock",
    "Provider",
    "ProviderThread",
    "ReceivedMessage",
    "Rule",
]
