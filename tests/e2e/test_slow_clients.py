"""Issue 12, finding 2: connections that never finish a request are closed, so silent sockets beyond the
file-descriptor limit do not stop ``/health`` (a real ``dispatchd serve``, real sockets)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import httpx

from tests.conftest import ADMIN_KEY, free_port
from tests.e2e.test_delivery_crash import start, stop, wait_until

FILE_LIMIT = 256  # the server's open files, soft and hard: it cannot raise it
SILENT = 300  # sockets that connect and never send a byte: more than the server has descriptors

#: ``dispatchd serve`` under a lowered RLIMIT_NOFILE (as on a host at 1,024)
SERVE_UNDER_LIMIT = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FILE_LIMIT}, {FILE_LIMIT})); "
    "sys.argv = ['dispatchd', 'serve', '--port', sys.argv[1]]; "
    "runpy.run_module('dispatchd', run_name='__main__')"
)


def _silent_sockets(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))  # completes in the kernel's backlog, accepted or not
        sockets.append(sock)
    return sockets


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # still open
    except OSError:
        return True  # reset


async def test_silent_sockets_beyond_the_fd_limit_do_not_stop_health(db_url, tmp_path):
    port = free_port()
    env = {
        "DISPATCHD_DATABASE_URL": db_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_HEADER_TIMEOUT_S": "1",
        "DISPATCHD_LOG_JSON": "true",
    }
    log = tmp_path / "serve.log"
    process = start([sys.executable, "-c", SERVE_UNDER_LIMIT, str(port)], log, env)
    url = f"http://127.0.0.1:{port}"
    sockets: list[socket.socket] = []
    try:

        async def up() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{url}/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(up, 30, "server up", interval_s=0.1)
        assert "the open-file limit is low" in log.read_text()  # warned at start

        sockets = _silent_sockets(port, SILENT)
        started = time.monotonic()
        # While every silent socket is still held by this test, /health answers again once the header
        # timeout (1 s) has closed them on the server's side: before the fix, never while they were held.
        await wait_until(up, 6, "/health answering despite the silent sockets", interval_s=0.2)
        assert time.monotonic() - started < 6

        await asyncio.sleep(1)
        closed = sum(_closed_by_server(sock) for sock in sockets)
        assert closed >= FILE_LIMIT // 2, f"only {closed} of {SILENT} silent sockets were closed"
    finally:
        for sock in sockets:
            sock.close()
        stop(process)
