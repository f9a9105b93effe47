"""Helpers of the console's browser tests: a real ``dispatchd serve``, a fake WhatsApp Cloud API that can
refuse a phone for good, headless Chromium through Playwright, and the page-side probes (when a row
appeared, what a page weighed, how fast it painted).

The server's phone channel is ``whatsapp_cloud`` pointed at :class:`Provider`, a small Cloud API fake
running in the test's event loop: it accepts every message (200, a ``wamid``) except those to a phone in
``refuse``, answered 400 with Meta code 131026 ("Message undeliverable": PERMANENT in
:mod:`dispatchd.notifications.classify`), so the outbox marks that message FAILED_PERMANENT, as a real
undeliverable number would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import ADMIN_KEY, admin_headers, free_port, reset_postgres
from tests.e2e.test_delivery_crash import start, stop, wait_until

CHROMIUM = os.environ.get("DISPATCHD_TEST_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
UNDELIVERABLE = {
    "error": {
        "message": "(#131026) Message Undeliverable",
        "type": "OAuthException",
        "code": 131026,
        "error_data": {"messaging_product": "whatsapp", "details": "Message Undeliverable."},
        "fbtrace_id": "AbCdEfGhIjK",
    }
}


# ------------------------------------------------------------------------------------ the fake provider


@dataclass
class Provider:
    """A WhatsApp Cloud API fake: ``POST /{version}/{phone_number_id}/messages``."""

    refuse: set[str] = field(default_factory=set)  # E.164 numbers answered 400 / 131026
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body() or b"{}")
        to = "+" + str(body.get("to", "")).lstrip("+")
        if to in self.refuse:
            self.refused.append(body)
            return JSONResponse(UNDELIVERABLE, status_code=400)
        self.accepted.append(body)
        wamid = f"wamid.{uuid.uuid4().hex}"
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body.get("to"), "wa_id": str(body.get("to", "")).lstrip("+")}],
                "messages": [{"id": wamid}],
            }
        )

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{version}/{phone_number_id}/messages", self.send, methods=["POST"])])


@contextlib.asynccontextmanager
async def serving_provider(provider: Provider) -> AsyncIterator[str]:
    config = uvicorn.Config(
        provider.app(), host="127.0.0.1", port=free_port(), log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: _true(server.started), 10, "the fake provider started")
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await task


async def _true(value: bool) -> bool:
    return value


# -------------------------------------------------------------------------------------------- the server


@dataclass
class Console:
    url: str
    process: subprocess.Popen
    log: Path
    provider: Provider
    http: httpx.AsyncClient  # admin key, base_url = the server

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.asynccontextmanager
async def console_server(
    db_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[Console]:
    """A ``dispatchd serve`` process on ``db_url`` (emptied first on PostgreSQL), channel
    ``whatsapp_cloud`` to a :class:`Provider`; yields a :class:`Console` with an admin client."""
    if db_url.startswith("postgresql"):
        await reset_postgres(db_url)
    provider = Provider()
    async with serving_provider(provider) as provider_url:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "server.log"
        process = start(
            [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)],
            log,
            {
                "DISPATCHD_DATABASE_URL": db_url,
                "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
                "DISPATCHD_DRIVER_STALE_AFTER_S": "0",
                "DISPATCHD_RATE_LIMIT": "",
                "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
                "DISPATCHD_WHATSAPP_API_BASE_URL": f"{provider_url}/v21.0",
                "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
                "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": "1234567890",
                "DISPATCHD_RECIPIENT_INTERVAL_S": "0",
                "DISPATCHD_SWEEP_INTERVAL_S": "0.2",
                "DISPATCHD_AGENT_PRESENCE_TIMEOUT_S": "3600",
                "DISPATCHD_LOG_LEVEL": "WARNING",
                **(env or {}),
            },
        )
        try:

            async def up() -> bool:
                assert process.poll() is None, log.read_text(errors="replace")[-3000:]
                try:
                    async with httpx.AsyncClient(timeout=2) as probe:
                        return (await probe.get(f"{url}/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, 60, "dispatchd serve ready", interval_s=0.1)
            async with httpx.AsyncClient(base_url=url, headers=admin_headers(), timeout=15) as http:
                yield Console(url, process, log, provider, http)
        finally:
            stop(process)


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 201), (
        f"{response.request.url}: {response.status_code} {response.text}"
    )
    return response.json()


async def agent_key(http: httpx.AsyncClient, agent_id: str) -> str:
    return created(await http.post("/v1/api-keys", json={"role": "agent", "subject": f"agent:{agent_id}"}))[
        "key"
    ]


async def notifications(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    return created(await http.get("/v1/notifications", params=params))["notifications"]


# ------------------------------------------------------------------------------------------- the browser


async def launch(playwright):
    return await playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
    )


async def sign_in(page, url: str, key: str) -> Any:
    """Fill and send the sign-in form; the response of the POST (a 303 is followed by the browser)."""
    await page.goto(f"{url}/console/sign-in")
    await page.fill("#api_key", key)
    async with page.expect_navigation():
        await page.click("form[action='/console/sign-in'] button[type=submit]")
    return page


async def wait_live(page, timeout_ms: float = 10_000) -> None:
    """Wait for the page's event stream to be connected (``#live-status[data-state=open]``)."""
    await page.wait_for_selector("#live-status[data-state=open]", timeout=timeout_ms)


#: Records, in the page, the first time (Date.now(), ms) each watched selector matched: a MutationObserver,
#: so the time is the DOM change itself, not when the test polled for it.
WATCH = """
(selectors) => {
  window.__seen = window.__seen || {};
  const check = (watched) => {
    for (const s of watched) {
      if (!(s in window.__seen) && document.querySelector(s)) window.__seen[s] = Date.now();
    }
  };
  if (!window.__observer) {
    window.__watched = [];
    window.__observer = new MutationObserver(() => check(window.__watched));
    window.__observer.observe(document.documentElement, {subtree: true, childList: true, attributes: true});
  }
  window.__watched.push(...selectors);
  check(selectors);
  return selectors.filter((s) => s in window.__seen);
}
"""


async def watch(page, *selectors: str) -> None:
    already = await page.evaluate(WATCH, list(selectors))
    assert not already, f"already on the page before the action: {already}"


async def seen_at(page, selector: str, timeout_s: float = 10.0) -> float:
    """When (ms since the epoch, the page's clock) ``selector`` first matched; waits for it."""

    async def seen() -> float | None:
        return await page.evaluate("(s) => (window.__seen || {})[s] || null", selector)

    return await wait_until(seen, timeout_s, f"{selector} in the page", interval_s=0.02)


def now_ms() -> float:
    return time.time() * 1000  # the same wall clock as the page's Date.now() (one machine)


#: A page's weight and first render, read from the Performance API once the page has loaded.
TIMINGS = """
() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const resources = performance.getEntriesByType("resource");
  const paint = Object.fromEntries(performance.getEntriesByType("paint").map((p) => [p.name, p.startTime]));
  const sum = (key) => resources.reduce((n, r) => n + (r[key] || 0), 0);
  return {
    transferred_bytes: nav.transferSize + sum("transferSize"),
    decoded_bytes: nav.decodedBodySize + sum("decodedBodySize"),
    document_transferred_bytes: nav.transferSize,
    resources: resources.map((r) => ({
      name: r.name.replace(location.origin, ""), transferred: r.transferSize, decoded: r.decodedBodySize,
    })),
    response_end_ms: nav.responseEnd,
    dom_content_loaded_ms: nav.domContentLoadedEventEnd,
    load_ms: nav.loadEventEnd,
    first_paint_ms: paint["first-paint"] ?? null,
    first_contentful_paint_ms: paint["first-contentful-paint"] ?? null,
  };
}
"""


async def measure_page(context, url: str) -> dict[str, Any]:
    """Open ``url`` in a new page of ``context`` with the HTTP cache off (every byte is fetched), wait
    for the load event and the stream, and return :data:`TIMINGS`."""
    page = await context.new_page()
    try:
        cdp = await context.new_cdp_session(page)
        await cdp.send("Network.enable")
        await cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        await page.goto(url, wait_until="load")
        await wait_live(page)
        await page.wait_for_timeout(300)  # anything the page fetches right after loading
        return await page.evaluate(TIMINGS)
    finally:
        await page.close()


# ------------------------------------------------------------------------ a screenshot of a failed test

REPORT = pytest.StashKey[dict[str, pytest.TestReport]]()


class _Reports:
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        item.stash.setdefault(REPORT, {})[report.when] = report
        return report


def register_reports(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("dispatchd-console-reports"):
        config.pluginmanager.register(_Reports(), "dispatchd-console-reports")


def failed(item: pytest.Item) -> bool:
    reports = item.stash.get(REPORT, {})
    return any(r.failed for r in reports.values())
