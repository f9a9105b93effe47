"""HTTP/2 or HTTP/1.1 keep-alive to the provider: the client's CPU per send, measured (issue 11).

The delivery worker's cost per message is mostly the HTTP client's Python (see the flame graph in
docs/profiles/notifications.svg). This runs the ``whatsapp_cloud`` channel alone, in this process, against
the fake WhatsApp Cloud API served by Hypercorn in another process (Hypercorn speaks HTTP/1.1 and HTTP/2
over cleartext, "prior knowledge" h2c; uvicorn speaks only HTTP/1.1 and is measured too), with
``--concurrency`` sends in flight, and prints per client setting: sends per second and the client's CPU
milliseconds per send (``time.process_time`` of this process ÷ sends: what a dispatchd worker pays).

Meta's Graph API is HTTPS; over TLS HTTP/2 is negotiated by ALPN and adds the same framing cost measured
here plus TLS, which neither setting avoids. Needs ``h2`` and ``hypercorn`` (``pip install h2 hypercorn``).

Usage: ``python -m bench.notifications_http2 [--sends 3000] [--concurrency 32] [--latency-ms 5]
[--fail-rate 0.2] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import free_port, machine
from bench.notifications_outcome import load
from bench.notifications_procs import http_ok, shutdown, spawn, wait_for
from dispatchd.notifications.channels.base import ChannelError, OutboundMessage
from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel


def serve(port: int, server: str, fail_rate: float, latency_ms: float, seed: int = 4) -> None:
    """Serve the fake with ``server`` (``hypercorn``: HTTP/1.1 and h2c; ``uvicorn``: HTTP/1.1) until
    killed (``bench.bench_notifications --provider-http 2`` runs its fake this way)."""
    from dispatchd.testing.fake_whatsapp import FakeWhatsApp

    app = FakeWhatsApp(fail_rate, latency_ms / 1000, seed).app()
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, backlog=1024)
        return
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.backlog = 1024
    config.h2_max_concurrent_streams = 1000
    # Hypercorn ends a connection after 1,000 requests by default (GOAWAY); httpx then fails the streams
    # racing it (WriteError: CONNECTION, retried) — a burst of 32 such failures can open the breaker. The
    # fake keeps its connections, as uvicorn's keep-alive does: the run measures the protocols' cost.
    config.keep_alive_max_requests = int(os.environ.get("BENCH_H2_MAX_REQUESTS", 10**9))
    asyncio.run(hypercorn_serve(app, config))


async def measure(
    base: str, http: httpx.AsyncClient, sends: int, concurrency: int
) -> tuple[float, float, str]:
    """(sends per second, client CPU ms per send, HTTP version seen) for ``sends`` messages."""
    channel = WhatsAppCloudChannel(f"{base}/v21.0", "1234567890", "fake-token", http=http)
    gate = asyncio.Semaphore(concurrency)
    versions: set[str] = set()

    async def one(i: int) -> None:
        async with gate:
            try:
                await channel.send(
                    OutboundMessage(f"ntf_{i}", f"+22170{i:07d}", "driver_offer", f"Course #{i}")
                )
            except ChannelError:
                pass

    # warm up: open the connections
    await asyncio.gather(*(one(i) for i in range(concurrency * 2)))
    response = await http.post(f"{base}/v21.0/1/messages", json={"to": "1"})
    versions.add(response.http_version)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(sends)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return sends / wall, cpu * 1000 / sends, ",".join(sorted(versions))


CLIENTS = {
    "HTTP/1.1 keep-alive, pool 200 (before)": lambda: httpx.AsyncClient(
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=200), timeout=10
    ),
    "HTTP/1.1 keep-alive, pool = concurrency": None,  # built with --concurrency below
    "HTTP/2, one connection (h2c prior knowledge)": lambda: httpx.AsyncClient(
        http1=False, http2=True, timeout=10
    ),
}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sends", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    load_before = load()
    results: list[tuple[str, str, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-http2-") as folder:
        for server in ("hypercorn", "uvicorn"):
            port = free_port()
            log = Path(folder) / f"{server}.log"
            process = spawn(
                [sys.executable, "-m", "bench.notifications_http2", "--serve", str(port), "--server", server,
                 "--fail-rate", str(args.fail_rate), "--latency-ms", str(args.latency_ms)],
                log,
            )  # fmt: skip
            base = f"http://127.0.0.1:{port}"
            try:
                await wait_for(lambda base=base: http_ok(f"{base}/stats"), 20, server, process, log)
                for name, make in CLIENTS.items():
                    if server == "uvicorn" and "HTTP/2" in name:
                        continue  # uvicorn has no HTTP/2
                    for _ in range(args.repeats):
                        if make is None:
                            limits = httpx.Limits(
                                max_connections=args.concurrency, max_keepalive_connections=args.concurrency
                            )
                            http = httpx.AsyncClient(limits=limits, timeout=10)
                        else:
                            http = make()
                        async with http:
                            rate, cpu_ms, version = await measure(base, http, args.sends, args.concurrency)
                        results.append((server, name, rate, cpu_ms, version))
            finally:
                shutdown(process)
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load()}")
    print(
        f"{args.sends} sends, {args.concurrency} in flight, fake: {args.fail_rate:.0%} fail, "
        f"{args.latency_ms:g} ms per answer; client = this process (the whatsapp_cloud channel)"
    )
    print()
    print("| server | client | HTTP version | sends/s | client CPU per send |")
    print("|---|---|---|---|---|")
    for server, name, rate, cpu_ms, version in results:
        print(f"| {server} | {name} | {version} | {rate:,.0f} | {cpu_ms:.3f} ms |")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        options = argparse.ArgumentParser()
        options.add_argument("--serve", type=int)
        options.add_argument("--server", default="hypercorn")
        options.add_argument("--fail-rate", type=float, default=0.2)
        options.add_argument("--latency-ms", type=float, default=5.0)
        options.add_argument("--seed", type=int, default=4)
        served = options.parse_args()
        serve(served.serve, served.server, served.fail_rate, served.latency_ms, served.seed)
    else:
        asyncio.run(main())
