"""Test fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``DISPATCHD_TEST_POSTGRES_URL`` (default: the local ``test`` database, whose server
hosts a throw-away database per test session). When it is unreachable the PostgreSQL half skips with
the reason, unless ``DISPATCHD_REQUIRE_SERVICES=1`` (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import itertools
import os
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import dispatchd
from dispatchd.app import Services, build_services, create_app
from dispatchd.config import Settings
from dispatchd.core import auth
from dispatchd.core.clock import ManualClock
from dispatchd.core.db import Base, Database
from dispatchd.migrate import upgrade

ADMIN_KEY = "dk_test_admin_key_0123456789abcdef"
REQUIRE_SERVICES = os.environ.get("DISPATCHD_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get(
    "DISPATCHD_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DISPATCHD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

#: What marks a module that maps a table: a declarative class, or a ``Table("name", metadata, …)``.
_MAPS_A_TABLE = re.compile(r"__tablename__|\bTable\(\s*[\"']")


def _import_model_modules() -> None:
    """Import every ``dispatchd`` module that maps a table, so that ``Base.metadata`` holds them all
    (found by reading the sources: a module added later is picked up without editing this file)."""
    package = Path(dispatchd.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).with_suffix("")
        if "migrations" in relative.parts or not _MAPS_A_TABLE.search(path.read_text(encoding="utf-8")):
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        importlib.import_module(".".join(("dispatchd", *parts)))


_import_model_modules()
#: Every table of the schema, children before parents (safe order for deletes; PostgreSQL's
#: ``TRUNCATE … CASCADE`` does not need it).
TABLES = [table.name for table in reversed(Base.metadata.sorted_tables)]


def run_blocking(coroutine_function, *args):
    """Run a coroutine to completion on its own loop in a thread: session fixtures may be first requested
    from inside a running test loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine_function(*args)).result()


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (DISPATCHD_REQUIRE_SERVICES=1, so this fails instead of skipping)")
    pytest.skip(reason)


async def _create_postgres_database(prefix: str = "dispatchd_test", *, migrate: bool = True) -> str:
    """Create a fresh database on the test server, migrate it (unless ``migrate`` is false: empty, no
    ``alembic_version``), return its URL."""
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    if not migrate:
        return url
    db = Database(url)
    try:
        await upgrade(db)
    finally:
        await db.dispose()
    return url


async def _unmapped_tables(url: str) -> set[str]:
    """Tables the migrations created that ``TABLES`` (the metadata) does not know: never emptied."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - set(TABLES) - {"alembic_version"}


async def _drop_postgres_database(url: str) -> None:
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> AsyncIterator[str]:
    try:
        url = run_blocking(lambda: asyncio.wait_for(_create_postgres_database(), 30))
    except Exception as exc:  # unreachable server, wrong credentials…
        _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}"[:300])
    unmapped = run_blocking(_unmapped_tables, url)
    if unmapped:
        run_blocking(_drop_postgres_database, url)
        pytest.fail(f"tables missing from Base.metadata, so never emptied between tests: {sorted(unmapped)}")
    yield url
    run_blocking(_drop_postgres_database, url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis (``DISPATCHD_TEST_REDIS_URL``), or a skip with the reason (a failure in CI)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        _unavailable(f"Redis not reachable at {REDIS_URL}: {type(exc).__name__}: {exc}"[:300])
    return REDIS_URL


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (faster than migrating every time)."""
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def build() -> None:
        db = Database(f"sqlite+aiosqlite:///{path}")
        await upgrade(db)
        await db.dispose()  # the last connection to close checkpoints the WAL into the file

    run_blocking(build)
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of the requested backend."""
    if backend == "sqlite":
        target = tmp_path / "dispatchd.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        return f"sqlite+aiosqlite:///{target}"
    url = request.getfixturevalue("postgres_url")
    await reset_postgres(url)
    return url


async def reset_postgres(url: str) -> None:
    """Empty every table of the session's PostgreSQL database."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make_settings(db_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "admin_api_key": ADMIN_KEY,
        "driver_stale_after_s": 0,
        "log_json": False,
        "admin_phones": ["+33600000000"],
        "rate_limit": "",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@pytest.fixture
async def services(settings: Settings, clock: ManualClock) -> AsyncIterator[Services]:
    built = build_services(settings, clock)
    async with built.db.transaction() as session:
        await auth.ensure_admin_key(session, ADMIN_KEY)
    yield built
    await built.aclose()


_phones = itertools.count(1)


def new_phone() -> str:
    return f"+2217{next(_phones):08d}"


def driver_data(**overrides: object) -> dict:
    data = {
        "name": "Driver",
        "phone": new_phone(),
        "vehicle_type": "Berline",
        "vehicle_plate": "DK-0000-AA",
        "rating": 4.5,
        "status": "AVAILABLE",
        "lat": 14.69,
        "lon": -17.44,
    }
    data.update(overrides)
    return data


def booking_data(**overrides: object) -> dict:
    data = {
        "customer_name": "Awa Ndiaye",
        "customer_phone": new_phone(),
        "pickup_address": "Place de l'Indépendance",
        "pickup_lat": 14.6681,
        "pickup_lon": -17.4312,
        "drop_address": "Aéroport AIBD",
        "drop_lat": 14.67,
        "drop_lon": -17.07,
    }
    data.update(overrides)
    return data


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def client(
    services: Services, settings: Settings, clock: ManualClock
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client (ASGI transport) on an app sharing ``services``' database and clock."""
    app = create_app(settings, clock=clock, run_migrations=False, background=False, services=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=admin_headers()
    ) as http:
        yield http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serve_app(app, port: int | None = None, *, before_stop=None) -> AsyncIterator[str]:
    """Run ``app`` on a real uvicorn server on a loopback port (a free one unless given); yield its base
    URL; stop it on exit (``before_stop``, awaited first, may end open streams; those left are cut
    after 2 s)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port or free_port(),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(250):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        if before_stop is not None:
            await before_stop()
        server.should_exit = True
        await task


@pytest.fixture
async def live_server(settings: Settings, clock: ManualClock) -> AsyncIterator[str]:
    """A real uvicorn server on a free loopback port (its own services, same database and clock)."""
    async with serve_app(create_app(settings, clock=clock, run_migrations=False, background=False)) as url:
        yield url
