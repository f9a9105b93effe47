"""``dispatchd serve`` (one process, or ``--workers N`` under uvicorn's supervisor) and ``dispatchd
migrate``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from dispatchd.cli.common import console, errors, settings, with_db

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dispatchd.config import Settings

#: the import string of :func:`served_app`, which each process of ``serve --workers N`` calls
APP_FACTORY = "dispatchd.cli.server:served_app"

POSTGRES_HINT = "set DISPATCHD_DATABASE_URL=postgresql+asyncpg://user:password@host:5432/db"


def refuse(command: str, reason: str) -> None:
    """Print ``dispatchd <command>: <reason>`` on one line of stderr and exit 2 (bad options)."""
    errors.print(f"[bold red]dispatchd {command}:[/] {reason}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address [env DISPATCHD_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [env DISPATCHD_PORT, default 8000]")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Processes answering on the port, under uvicorn's supervisor (a dead one is replaced); "
            "more than 1 needs PostgreSQL [env DISPATCHD_WORKERS, default 1]",
        ),
    ] = None,
    delivery: Annotated[
        bool | None,
        typer.Option(
            "--delivery/--no-delivery",
            help="Run the outbox delivery loop in these processes; --no-delivery leaves it to `dispatchd "
            "worker` (PostgreSQL) [env DISPATCHD_SERVE_DELIVERY, default true]",
        ),
    ] = None,
) -> None:
    """Migrate the database, then serve the API with the sweeper, the delivery loop, the alert monitor and
    the realtime hub in each process.

    Production layout on PostgreSQL: `serve --workers N --no-delivery` beside `dispatchd worker
    --processes M` (docs/operations.md, "Processes"). On SQLite one process serves and delivers: --workers
    above 1 and --no-delivery exit 2. SIGTERM drains requests for up to 10 s and stops the loops after their
    current batch. DISPATCHD_CHANNEL_RATE is shared by the processes that deliver.

    Connections that send no complete request headers within DISPATCHD_HEADER_TIMEOUT_S are closed, idle
    keep-alive ones after DISPATCHD_KEEP_ALIVE_TIMEOUT_S; DISPATCHD_LIMIT_CONCURRENCY caps connections (per
    process). The open-file limit is raised to its hard limit at start (a warning when it stays below
    4096)."""
    config = settings(host=host, port=port, workers=workers, serve_delivery=delivery)
    if config.is_sqlite and config.workers > 1:
        refuse(
            "serve",
            f"--workers {config.workers} needs PostgreSQL (processes writing one SQLite file do not share "
            f"its writer queue); {POSTGRES_HINT}, or serve with --workers 1",
        )
    if config.is_sqlite and not config.serve_delivery:
        refuse(
            "serve",
            "--no-delivery needs PostgreSQL (on SQLite no `dispatchd worker` may deliver instead, so no "
            f"message would leave); {POSTGRES_HINT}, or serve with --delivery",
        )
    if config.workers == 1:
        _run_one(config)
    else:
        _run_several(config)


def _uvicorn_options(config: Settings) -> dict:
    from dispatchd.core.serving import HeaderTimeoutProtocol

    return {
        "host": config.host,
        "port": config.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        "http": HeaderTimeoutProtocol,
        "timeout_keep_alive": config.keep_alive_timeout_s,
        "limit_concurrency": config.limit_concurrency,
    }


def _prepared_app(config: Settings, *, run_migrations: bool) -> FastAPI:
    """What every serving process does before it serves: logging, the file limit, the header timeout, the
    app (without the delivery loop under ``--no-delivery``), then the garbage collector's tuning."""
    from dispatchd.app import create_app
    from dispatchd.core.logging import configure_logging
    from dispatchd.core.serving import HeaderTimeoutProtocol, raise_file_limit, tune_garbage_collector

    configure_logging(config.log_level, json=config.log_json)
    raise_file_limit()
    HeaderTimeoutProtocol.header_timeout_s = config.header_timeout_s
    skip = () if config.serve_delivery else ("delivery",)
    app = create_app(config, run_migrations=run_migrations, skip_loops=skip)
    tune_garbage_collector()
    return app


def served_app() -> FastAPI:
    """uvicorn's app factory (:data:`APP_FACTORY`) for each process of ``serve --workers N``; runs in the
    child. Settings come from the environment, where the parent wrote its command-line options
    (``DISPATCHD_SERVE_DELIVERY``) and each process's share of ``DISPATCHD_CHANNEL_RATE``. The parent has
    migrated the database already."""
    from dispatchd.config import load_settings

    return _prepared_app(load_settings(), run_migrations=False)


def _run_one(config: Settings) -> None:
    import uvicorn

    uvicorn.run(_prepared_app(config, run_migrations=True), **_uvicorn_options(config))


def _run_several(config: Settings) -> None:
    """Migrate once (and print a generated admin key once), then uvicorn's supervisor: it binds the port,
    spawns ``config.workers`` processes that each call :func:`served_app`, replaces one that dies and
    stops them all on SIGTERM / SIGINT (exit 0). A process that fails before it serves stops the whole
    command with exit 1 (a replacement would fail the same way)."""
    from uvicorn import Config
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from dispatchd.core.logging import configure_logging, get_logger
    from dispatchd.core.serving import share_rate
    from dispatchd.migrate import prepare_database

    configure_logging(config.log_level, json=config.log_json)
    log = get_logger("dispatchd.serve")
    try:
        with_db(lambda db: prepare_database(db, config), config)
    except Exception:  # logged without the frames' locals (the database URL may hold a password)
        log.exception("dispatchd serve could not prepare the database")
        raise typer.Exit(1) from None
    os.environ["DISPATCHD_SERVE_DELIVERY"] = "true" if config.serve_delivery else "false"
    if config.serve_delivery and config.channel_rate:
        os.environ["DISPATCHD_CHANNEL_RATE"] = share_rate(config.channel_rate, config.workers) or ""
    uvicorn_config = Config(APP_FACTORY, factory=True, workers=config.workers, **_uvicorn_options(config))
    log.info(
        "dispatchd serve supervising processes",
        workers=config.workers,
        delivery=config.serve_delivery,
        pid=os.getpid(),
    )
    supervisor = Multiprocess(uvicorn_config, sockets=[uvicorn_config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        errors.print("[bold red]dispatchd serve:[/] a process failed to start (see the log above)")
        sys.exit(1)


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
