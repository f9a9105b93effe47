"""Every migration goes up and down on SQLite and PostgreSQL, and ``dispatchd migrate --to`` drives it.

Each test gets an empty database of its own (the shared PostgreSQL test database is never downgraded).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from dispatchd.core.db import Database
from dispatchd.migrate import (
    UnknownRevision,
    current_revision,
    downgrade,
    migrate_to,
    resolve_revision,
    revisions,
    upgrade,
)
from tests.conftest import (
    POSTGRES_URL,
    _create_postgres_database,
    _drop_postgres_database,
    _unavailable,
    run_blocking,
)


@pytest.fixture
def empty_url(backend: str, tmp_path) -> Iterator[str]:
    """An empty database (no table, no alembic_version) of the requested backend, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    try:
        url = run_blocking(lambda: _create_postgres_database("dispatchd_migrations", migrate=False))
    except Exception as exc:
        _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}"[:300])
    yield url
    run_blocking(_drop_postgres_database, url)


async def schema(db: Database) -> dict[str, tuple]:
    """Each table (alembic_version aside): its columns (name, type, nullable) and its index names, sorted
    (a column dropped then added again comes last: its position does not matter)."""

    def read(sync) -> dict[str, tuple]:
        inspector = inspect(sync)
        return {
            table: (
                tuple(
                    sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table))
                ),
                tuple(sorted(i["name"] for i in inspector.get_indexes(table))),
            )
            for table in sorted(inspector.get_table_names())
            if table != "alembic_version"
        }

    async with db.engine.connect() as connection:
        return await connection.run_sync(read)


async def test_upgrade_head_downgrade_base_upgrade_head(empty_url: str) -> None:
    db = Database(empty_url)
    try:
        await upgrade(db)
        at_head = await schema(db)
        assert await current_revision(db) == revisions()[-1]
        assert {"bookings", "reservations", "notifications", "conversations", "console_sessions"} <= set(
            at_head
        )

        await downgrade(db, "base")
        assert await current_revision(db) is None
        assert await schema(db) == {}, "a downgrade to base leaves tables behind"

        await upgrade(db)
        assert await current_revision(db) == revisions()[-1]
        assert await schema(db) == at_head
    finally:
        await db.dispose()


async def test_every_migration_steps_down_then_up_to_the_same_schema(empty_url: str) -> None:
    db = Database(empty_url)
    order = [None, *revisions()]
    try:
        going_up: dict[str | None, dict] = {None: await schema(db)}
        for revision in order[1:]:
            before, after = await migrate_to(db, revision)
            assert after == revision and before == order[order.index(revision) - 1]
            going_up[revision] = await schema(db)
        assert len({repr(s) for s in going_up.values()}) == len(order), "a migration changes nothing"

        for revision in reversed(order[:-1]):
            before, after = await migrate_to(db, revision or "base")
            assert after == revision and before == order[order.index(revision) + 1]
            assert await schema(db) == going_up[revision], f"downgrade to {revision} differs from its upgrade"

        for revision in order[1:]:
            await migrate_to(db, revision)
            assert await schema(db) == going_up[revision], f"upgrade to {revision} again differs"
    finally:
        await db.dispose()


async def test_migrate_to_current_revision_changes_nothing(empty_url: str) -> None:
    db = Database(empty_url)
    try:
        assert await migrate_to(db, "0004") == (None, "0004")
        assert await migrate_to(db, "0004") == ("0004", "0004")
        assert await migrate_to(db, "head") == ("0004", revisions()[-1])
    finally:
        await db.dispose()


async def test_downgrade_keeps_a_driver_key_bound_to_its_driver(empty_url: str) -> None:
    """0005 moved ``api_keys.driver_id`` into ``subject``: down and up again, the binding survives."""
    db = Database(empty_url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        await upgrade(db)
        async with db.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO api_keys (id, key_hash, role, subject, name, created_at)"
                    " VALUES ('k1', 'h1', 'driver', 'driver:d42', 'phone', :now)"
                ),
                {"now": now},
            )
        await migrate_to(db, "0004")
        async with db.engine.connect() as connection:
            assert await connection.scalar(text("SELECT driver_id FROM api_keys WHERE id = 'k1'")) == "d42"
        await migrate_to(db, "head")
        async with db.engine.connect() as connection:
            assert (
                await connection.scalar(text("SELECT subject FROM api_keys WHERE id = 'k1'")) == "driver:d42"
            )
    finally:
        await db.dispose()


def test_resolve_revision_names() -> None:
    assert resolve_revision("head") == revisions()[-1]
    assert resolve_revision("base") is None
    assert resolve_revision("0003") == "0003"
    with pytest.raises(UnknownRevision, match="'42'"):
        resolve_revision("42")


async def test_a_database_written_by_a_newer_release_is_refused(empty_url: str) -> None:
    db = Database(empty_url)
    try:
        await upgrade(db)
        async with db.engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(UnknownRevision, match="'9999'.*release that wrote it"):
            await migrate_to(db, "0007")
        async with db.engine.connect() as connection:
            assert await connection.scalar(text("SELECT version_num FROM alembic_version")) == "9999"
    finally:
        await db.dispose()


def test_cli_migrate_to_goes_down_and_up(empty_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHD_DATABASE_URL", empty_url)
    runner = CliRunner()

    result = runner.invoke(cli, ["migrate", "--to", "0006"])
    assert result.exit_code == 0, result.output
    assert "database at revision 0006 (was base)" in result.stdout

    result = runner.invoke(cli, ["migrate", "--to", "0002"])
    assert result.exit_code == 0, result.output
    assert "database at revision 0002 (was 0006)" in result.stdout

    result = runner.invoke(cli, ["migrate", "--to", "nope"])
    assert result.exit_code == 1
    assert "unknown revision 'nope'" in result.stderr

    result = runner.invoke(cli, ["migrate", "--to", "base"])
    assert result.exit_code == 0, result.output
    assert "database at revision base (was 0002)" in result.stdout

    async def tables() -> list[str]:
        db = Database(empty_url)
        try:
            return sorted(await schema(db))
        finally:
            await db.dispose()

    assert run_blocking(tables) == []
