"""Schema migrations (Alembic, one history valid on SQLite and PostgreSQL) and start-up preparation."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import text
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from dispatchd.config import Settings
from dispatchd.core import auth
from dispatchd.core.db import Database
from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.migrate")

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x6D69677261746520  # "migrate "


def alembic_config(connection=None) -> Config:
    """An Alembic config pointing at the packaged migrations, sharing ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def wait_for_database(db: Database, timeout_s: float = 30.0) -> None:
    """Retry ``SELECT 1`` with exponential backoff (0.2 s … 5 s) for up to ``timeout_s`` seconds."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_exponential(multiplier=0.2, max=5),
        retry=retry_if_exception_type((OSError, ConnectionError, Exception)),
        reraise=True,
    ):
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                log.warning(
                    "database not reachable yet, retrying", attempt=attempt.retry_state.attempt_number
                )
            await db.ping()


async def upgrade(db: Database, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. On PostgreSQL an advisory lock lets N servers start at once."""
    async with db.engine.begin() as connection:
        if db.is_postgres:
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), revision))


async def downgrade(db: Database, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base``: an empty schema), under the same lock as upgrade."""
    async with db.engine.begin() as connection:
        if db.is_postgres:
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await connection.run_sync(lambda sync: command.downgrade(alembic_config(sync), revision))


class UnknownRevision(ValueError):
    """``dispatchd migrate --to`` was given a revision this release does not ship."""


def revisions() -> list[str]:
    """The revisions this release ships, oldest first (``base`` comes before the first)."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def resolve_revision(revision: str) -> str | None:
    """The revision id ``revision`` names: ``head``, ``base`` (None) or an id this release ships
    (``0003``); :class:`UnknownRevision` otherwise."""
    if revision == "base":
        return None
    script = ScriptDirectory.from_config(alembic_config())
    if revision in ("head", "heads"):
        return script.get_current_head()
    try:
        found = script.get_revision(revision)
    except AlembicError as exc:
        raise UnknownRevision(f"unknown revision {revision!r}: {exc}") from None
    if found is None:
        raise UnknownRevision(f"unknown revision {revision!r}")
    return found.revision


async def migrate_to(db: Database, revision: str) -> tuple[str | None, str | None]:
    """Bring the schema to ``revision`` (``head``, ``base`` or an id of :func:`revisions`), upgrading or
    downgrading as needed; return (revision before, revision after). A database at a revision this
    release does not know (written by a newer release) raises :class:`UnknownRevision`: roll back with
    the newer release's ``dispatchd migrate --to``, before installing the older one."""
    target = resolve_revision(revision)
    order = [None, *revisions()]
    before = await current_revision(db)
    if before not in order:
        raise UnknownRevision(
            f"the database is at revision {before!r}, which this release does not ship "
            f"(it knows {', '.join(order[1:])}); run `dispatchd migrate --to` from the release that wrote it"
        )
    if order.index(target) > order.index(before):
        await upgrade(db, target)
    elif order.index(target) < order.index(before):
        await downgrade(db, target or "base")
    return before, await current_revision(db)


async def current_revision(db: Database) -> str | None:
    async with db.engine.connect() as connection:
        exists = await connection.run_sync(lambda sync: sync.dialect.has_table(sync, "alembic_version"))
        if not exists:
            return None
        return await connection.scalar(text("SELECT version_num FROM alembic_version"))


async def prepare_database(db: Database, settings: Settings, *, migrate: bool = True) -> str | None:
    """Wait for the database, migrate it, make sure an admin key exists.

    Returns a newly generated admin key (to print once) or None.
    """
    await wait_for_database(db)
    if migrate:
        await upgrade(db)
    async with db.transaction() as session:
        generated = await auth.ensure_admin_key(session, settings.admin_api_key)
    if settings.admin_api_key and auth.weaker_than_generated(settings.admin_api_key):
        log.warning(
            "DISPATCHD_ADMIN_API_KEY is weaker than a generated key (256 random bits, 43 characters); "
            "replace it with the output of `python -c \"import secrets; print('dk_' + "
            'secrets.token_urlsafe(32))"`',
            length=len(settings.admin_api_key),
        )
    if generated:
        print(
            "\n  A new admin API key was generated. It is shown only this once; store it now:\n\n"
            f"    {generated}\n\n"
            "  (Set DISPATCHD_ADMIN_API_KEY to choose your own; more keys: `dispatchd keys create`.)\n",
            flush=True,
        )
    return generated
