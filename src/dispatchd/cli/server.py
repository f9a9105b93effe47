"""``dispatchd serve`` and ``dispatchd migrate``."""

from __future__ import annotations

from typing import Annotated

import typer

from dispatchd.cli.common import console, errors, settings, with_db


def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address [env DISPATCHD_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [env DISPATCHD_PORT, default 8000]")] = None,
) -> None:
    """Migrate the database, then serve the API with the sweeper and the delivery worker.

    Connections that send no complete request headers within DISPATCHD_HEADER_TIMEOUT_S are closed, idle
    keep-alive ones after DISPATCHD_KEEP_ALIVE_TIMEOUT_S; DISPATCHD_LIMIT_CONCURRENCY caps connections.
    The open-file limit is raised to its hard limit at start (a warning when it stays below 4096)."""
    import uvicorn

    from dispatchd.app import create_app
    from dispatchd.core.logging import configure_logging
    from dispatchd.core.serving import HeaderTimeoutProtocol, raise_file_limit, tune_garbage_collector

    config = settings(host=host, port=port)
    configure_logging(config.log_level, json=config.log_json)
    raise_file_limit()
    HeaderTimeoutProtocol.header_timeout_s = config.header_timeout_s
    app = create_app(config)
    tune_garbage_collector()
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        http=HeaderTimeoutProtocol,
        timeout_keep_alive=config.keep_alive_timeout_s,
        limit_concurrency=config.limit_concurrency,
    )


def migrate(
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="REVISION",
            help="Upgrade or downgrade to REVISION (head, base, or an id such as 0007) instead of head; "
            "does not create the admin key. Rolling back a release: run it with the newer release.",
        ),
    ] = None,
) -> None:
    """Apply the database migrations (also done by `serve` at start) and make sure an admin key exists;
    with --to, bring the schema to that revision, down included (exit 1 on an unknown revision)."""
    from dispatchd.migrate import (
        UnknownRevision,
        current_revision,
        migrate_to,
        prepare_database,
        wait_for_database,
    )

    config = settings()

    async def run(db) -> str | None:
        await prepare_database(db, config)
        return await current_revision(db)

    async def run_to(db) -> tuple[str | None, str | None]:
        await wait_for_database(db)
        return await migrate_to(db, to)

    if to is None:
        revision = with_db(run, config)
        console.print(f"database at revision [bold]{revision}[/]")
        return
    try:
        before, after = with_db(run_to, config)
    except UnknownRevision as exc:
        errors.print(f"[bold red]dispatchd migrate:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"database at revision [bold]{after or 'base'}[/] (was {before or 'base'})")
