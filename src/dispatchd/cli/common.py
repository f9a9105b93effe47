"""What every command shares: the consoles, the settings, and the one way a command opens the database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console

from dispatchd.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from dispatchd.core.db import Database

T = TypeVar("T")

#: stdout: what a command answers
console = Console()
#: stderr: why a command refused or failed
errors = Console(stderr=True)


def settings(**overrides: object) -> Settings:
    """The settings (``DISPATCHD_*`` environment variables or ``.env``), with the ``overrides`` given on
    the command line (None = not given). Invalid settings: the reason on stderr, exit code 2."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        errors.print(f"[bold red]dispatchd cannot start:[/] {exc}")
        raise typer.Exit(2) from None


def with_db(work: Callable[[Database], Awaitable[T]], config: Settings | None = None) -> T:
    """Run ``await work(db)`` on the configured database (``DISPATCHD_DATABASE_URL`` of ``config``, loaded
    by :func:`settings` when not given) and close it, whatever happens; return what ``work`` returned and
    let its exceptions through. Every command that opens the database goes through here."""
    from dispatchd.core.db import Database

    config = config or settings()

    async def run() -> T:
        db = Database(config.database_url)
        try:
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(run())
