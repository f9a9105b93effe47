"""Bulk inserts at the database's speed (issue 11): thousands of rows of one statement, such as a
broadcast's offers and events.

A Core ``insert()`` given 10,000 parameter sets spends most of its time in Python, per row and per value:
building each parameter set and running each column type's bind processing (a UTC datetime becomes
SQLite's text, a dict becomes JSON). :func:`insert_many` runs the type processing once for the values
every row shares (``shared``: a booking id, a timestamp) and only for the columns that need it per row,
then hands the rows to the driver as they are:

* PostgreSQL (asyncpg), from :data:`COPY_MIN_ROWS` rows: ``COPY … FROM STDIN`` (binary,
  ``copy_records_to_table``) inside the current transaction; fewer rows: the Core ``insert()``
  (SQLAlchemy's insertmanyvalues, faster than asyncpg's ``executemany`` here);
* SQLite: one ``executemany`` of one prepared ``INSERT`` (sqlite3's loop is in C).

Values are stored exactly as a Core insert stores them: the same type processing produces them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Column, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

#: From this many rows, PostgreSQL inserts go through COPY (below it, a COPY's set-up costs more).
COPY_MIN_ROWS = 500


def bind_processor(dialect: Dialect, column: Column[Any]) -> Callable[[Any], Any] | None:
    """The column type's bind processing for ``dialect``, as a Core insert runs it: through the dialect's
    own implementation of the type (``type.bind_processor(dialect)`` alone would skip it for a
    ``TypeDecorator``: SQLite's DATETIME text format, for one)."""
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def bind_value(dialect: Dialect, column: Column[Any], value: Any) -> Any:
    """``value`` as the driver takes it for ``column`` (the column type's bind processing)."""
    process = bind_processor(dialect, column)
    return process(value) if process is not None else value


async def insert_many(
    session: AsyncSession,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    shared: Mapping[str, Any] | None = None,
) -> None:
    """Insert ``rows`` into ``table`` in the session's transaction: each row a tuple of values for
    ``columns`` (plain Python values, as for a Core insert), plus the ``shared`` columns (one value for
    every row). Raises what the driver raises (an IntegrityError for a duplicate key, …)."""
    if not rows:
        return
    shared = dict(shared or {})
    dialect = session.bind.dialect
    names = [*columns, *shared]
    if dialect.name == "postgresql" and len(rows) < COPY_MIN_ROWS:
        await _core_insert(session, table, columns, rows, shared)
        return
    tail = tuple(bind_value(dialect, table.c[name], value) for name, value in shared.items())
    processors = [(i, p) for i, name in enumerate(columns) if (p := bind_processor(dialect, table.c[name]))]
    if processors:
        records = []
        for row in rows:
            values = list(row)
            for i, process in processors:
                values[i] = process(values[i])
            records.append((*values, *tail))
    else:
        records = [(*row, *tail) for row in rows]
    connection = await session.connection()
    if dialect.name == "postgresql":
        raw = (await connection.get_raw_connection()).driver_connection
        if raw.is_in_transaction():
            await raw.copy_records_to_table(table.name, columns=names, records=records)
            return
        # not yet in the transaction SQLAlchemy opens lazily: a COPY now would commit on its own
        await _core_insert(session, table, columns, rows, shared)
        return
    if dialect.paramstyle == "qmark":
        marks = ", ".join("?" for _ in names)
        await connection.exec_driver_sql(
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})", records
        )
        return
    await _core_insert(session, table, columns, rows, shared)  # pragma: no cover - other dialects


async def _core_insert(
    session: AsyncSession,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    shared: Mapping[str, Any],
) -> None:
    await session.execute(
        table.insert(), [{**dict(zip(columns, row, strict=True)), **shared} for row in rows]
    )
