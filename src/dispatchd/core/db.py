"""Async database access: engines, the unit of work, dialect helpers.

One :class:`Database` per process. Every state change runs inside :meth:`Database.transaction`,
which commits the change, its events and its notifications together (DESIGN.md, idea 1).

SQLite (embedded default): WAL mode, ``BEGIN IMMEDIATE`` for writes so two writers never deadlock on
a lock upgrade, and an in-process FIFO lock in front of the single writer slot so concurrent requests
queue instead of polling ``busy_timeout``. Races are still settled by conditional statements, which
is what keeps several processes on one file correct.

PostgreSQL: READ COMMITTED; conditional ``UPDATE … WHERE`` re-checks the row after a concurrent
commit, so the first writer wins and the rest see ``rowcount == 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from dispatchd.core.clock import Clock, SystemClock

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: PostgreSQL SQLSTATEs worth one more try: serialization_failure, deadlock_detected.
TRANSIENT_SQLSTATES = {"40001", "40P01"}


def is_transient(error: BaseException) -> bool:
    """A deadlock or serialisation failure (PostgreSQL), or "database is locked" (SQLite)."""
    if isinstance(error, OperationalError) and "database is locked" in str(error):
        return True
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) in TRANSIENT_SQLSTATES


#: Decorator for a unit of work that may be re-run from the start: the database rolled it back whole.
retry_transient = retry(
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(4),
    wait=wait_random_exponential(multiplier=0.01, max=0.2),
    reraise=True,
)


@contextlib.asynccontextmanager
async def savepoint(session: AsyncSession) -> AsyncIterator[None]:
    """``SAVEPOINT`` … ``RELEASE``, or ``ROLLBACK TO`` on an exception, together with what the unit of
    work buffers outside the database in ``session.info`` (events to append, touched ids, counters),
    so that a rolled-back part leaves no event behind."""
    saved = {key: _copy(value) for key, value in session.info.items()}
    try:
        async with session.begin_nested():
            yield
    except BaseException:
        session.info.clear()
        session.info.update(saved)
        raise


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, list | set | dict) else value


def lock_for_update(query):
    """``FOR NO KEY UPDATE`` on PostgreSQL (plain ``FOR UPDATE`` would also block the foreign-key checks
    of other transactions and deadlock with them); nothing on SQLite, whose writers are serialised."""
    return query.with_for_update(key_share=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        url,
        connect_args={"timeout": 30},
        hide_parameters=True,  # statement parameters (phones, messages) never reach a log or traceback
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - driver callback
        # Take transaction control away from pysqlite so that BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection) -> None:  # pragma: no cover - driver callback
        connection.exec_driver_sql(begin)

    return engine


class Database:
    """Engines and sessions for one database URL (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``)."""

    def __init__(
        self, url: str, *, clock: Clock | None = None, pool_size: int = 10, max_overflow: int = 20
    ) -> None:
        self.url = url
        self.clock: Clock = clock or SystemClock()
        #: Called with ``session.info`` after every successful commit (e.g. to wake the delivery worker).
        self.after_commit: list[Callable[[dict[str, Any]], None]] = []
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=2)
            self.read_engine = _sqlite_engine(url, begin="BEGIN", pool_size=pool_size)
        else:
            self.engine = create_async_engine(
                url,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                hide_parameters=True,  # statement parameters never reach a log or traceback
            )
            self.read_engine = self.engine
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)
        self._writer: asyncio.Lock | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def _writer_lock(self) -> contextlib.AbstractAsyncContextManager[object]:
        if not self.is_sqlite:
            return contextlib.nullcontext()
        if self._writer is None:
            self._writer = asyncio.Lock()
        return self._writer

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on normal exit, roll back on any exception.

        Events appended with :func:`dispatchd.core.events.append` are written last, just before the
        commit, so that their ids follow commit order (see ``events.flush``).
        """
        from dispatchd.core import events

        async with self._writer_lock(), self._sessions() as session:
            session.info["now"] = self.clock.now()
            async with session.begin():
                yield session
                await events.flush(session)
            info = dict(session.info)
        for hook in self.after_commit:
            hook(info)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (no writer lock on SQLite)."""
        async with self._read_sessions() as session, session.begin():
            session.info["now"] = self.clock.now()
            yield session

    async def ping(self) -> None:
        """Round-trip ``SELECT 1``; raises the driver's error when the database is unreachable."""
        async with self.read_engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
