"""The time `auth.verify` adds before the `250`, with a warm and a cold DNS cache.

    python bench/auth_latency.py            # 200 messages per variant

A relay in this process (uvloop when installed) between two loopback stand-in
providers, and a dnslib server on loopback holding SPF, DMARC and a 2048-bit
DKIM key for each of N sender domains. Each message is DKIM-signed, sent from
127.0.0.2 (authorised by SPF); the figure is the time from the client's final
"." to the relay's reply, over one kept-open SMTP session:

* off:  auth.verify false (today's path)
* warm: auth.verify true, the same sender domain every time (answers cached)
* cold: auth.verify true, a new sender domain every message (SPF, _dmarc and
        DKIM key lookups all go to the server, the key's answer over TCP)

Loopback DNS answers in well under a millisecond; a real resolver's round
trips (typically 1-50 ms each, SPF includes in series) come on top of "cold".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import config
from relay.app import Relay
from relay.testing import Provider
from tests.harness import relay_settings, write_relay
from tests.helpers_auth import AUTHORISED, key, message, signed
from tests.helpers_dns import LoopbackDNS


def zone(n: int) -> str:
    lines = []
    for i in range(n):
        d = f"d{i}.example.org"
        lines += [
            f'{d}. 300 IN TXT "v=spf1 ip4:127.0.0.2 -all"',
            f'_dmarc.{d}. 300 IN TXT "v=DMARC1; p=reject"',
            f"s1._domainkey.{d}. 300 IN TXT {key('bench').zone_txt()}",
        ]
    return "\n".join(lines) + "\n"


def sign_as(domain: str) -> bytes:
    return signed(message(f"a@{domain}"), domain, "s1", key_name="bench")


async def session(port: int, messages: list[tuple[str, bytes]]) -> list[float]:
    """Send each (sender, content) over one session; seconds from "." to the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(AUTHORISED, 0))

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.test\r\n")
    await reply()
    out = []
    for sender, data in messages:
        writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n".encode())
        for _ in range(3):
            await reply()
        writer.write(data)
        await writer.drain()
        start = time.perf_counter()
        writer.write(b".\r\n")
        line = await reply()
        out.append(time.perf_counter() - start)
        assert line.startswith(b"250"), line
    writer.write(b"QUIT\r\n")
    writer.close()
    return out


async def variant(name: str, n: int, dns: LoopbackDNS, folder: Path) -> list[float]:
    legacy, new = Provider("legacy"), Provider("new")
    await legacy.start()
    await new.start()
    auth = {"verify": name != "off", "timeout": 5, "add_authentication_results": True}
    settings = relay_settings(legacy.port, new.port, {
        "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 2}, "auth": auth,
        "node": "bench",
    })  # fmt: skip
    relay = Relay(config.load(write_relay(folder / name, settings)))
    await relay.start()
    try:
        if name == "cold":
            msgs = [(f"a@d{i}.example.org", sign_as(f"d{i}.example.org")) for i in range(1, n + 1)]
        else:
            msgs = [("a@d0.example.org", sign_as("d0.example.org"))] * (n + 1)
        took = await session(relay.port, msgs)
        return took[1:] if name != "cold" else took  # warm: the first one fills the cache
    finally:
        await relay.stop()
        await legacy.stop()
        await new.stop()


def ms(values: list[float], q: float) -> str:
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:6.2f}"


async def main(n: int) -> None:
    with LoopbackDNS(zone(n + 1)) as dns, tempfile.TemporaryDirectory() as tmp:
        print(f"{'variant':<6} {'n':>5} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
        results = {}
        for name in ("off", "warm", "cold"):
            took = await variant(name, n, dns, Path(tmp))
            results[name] = took
            print(f"{name:<6} {len(took):>5} {statistics.median(took) * 1000:10.2f} "
                  f"{ms(took, 0.95):>8} {max(took) * 1000:8.2f}")  # fmt: skip
        off = statistics.median(results["off"])
        for name in ("warm", "cold"):
            print(f"added before the 250, {name}: "
                  f"{(statistics.median(results[name]) - off) * 1000:.2f} ms (median)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.n))
    except ImportError:
        asyncio.run(main(args.n))
