"""The ``dispatchd`` command line (Typer): serve, migrate, keys, replay."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dispatchd import __version__
from dispatchd.config import Settings, SettingsError, load_settings

app = typer.Typer(
    help="dispatchd: a self-hosted dispatch engine for businesses that run on WhatsApp.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
resources_app = typer.Typer(help="Bulk operations on resources (seed 003).", no_args_is_help=True)
app.add_typer(resources_app, name="resources")
reservations_app = typer.Typer(help="Bulk operations on reservations (seed 003).", no_args_is_help=True)
app.add_typer(reservations_app, name="reservations")
notifications_app = typer.Typer(help="Inspect and retry outgoing messages (seed 004).", no_args_is_help=True)
app.add_typer(notifications_app, name="notifications")


def _with_db(work):
    """Run ``await work(db)`` on the configured database and close it."""
    from dispatchd.core.db import Database

    settings = _settings()

    async def run():
        db = Database(settings.database_url)
        try:
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(run())


@notifications_app.command("retry")
def notifications_retry(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be retried, change nothing")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="One block per message")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many messages")] = 100,
    max_retries: Annotated[int, typer.Option(min=1, help="Skip messages with this many attempts")] = 10,
) -> None:
    """Make failed (temporary) messages due now instead of waiting for their backoff."""
    from dispatchd.notifications import admin

    found = _with_db(lambda db: admin.retry_failed(db, limit=limit, max_retries=max_retries, dry_run=dry_run))
    rule = "=" * 60
    console.print(f"{rule}\n🔄 RETRY NOTIFICATIONS ÉCHOUÉES{' (simulation)' if dry_run else ''}\n{rule}\n")
    console.print(f"📊 Notifications trouvées : {len(found)}")
    console.print(f"🔢 Limite de tentatives : {max_retries}\n{rule}")
    for item in found:
        if verbose:
            due = item.next_attempt_at.strftime("%d/%m/%Y %H:%M") if item.next_attempt_at else "-"
            console.print(
                f"\n📧 Notification {item.id}\n   Destinataire: {item.recipient}\n"
                f"   Tentatives: {item.attempts}/{max_retries}\n   Prochaine tentative prévue: {due}\n"
                f"   Catégorie: {item.category}\n   Dernière erreur: {item.last_error or '-'}\n"
                + (
                    "   ➡️  serait mise en file"
                    if dry_run
                    else f"   ✅ Mise en file (tentative {item.attempts + 1})"
                )
            )
    console.print(f"\n{rule}\n📊 RÉSUMÉ DE L'EXÉCUTION\n{rule}")
    console.print(f"Total traité       : {len(found)}")
    console.print(f"Mises en file      : {0 if dry_run else len(found)}")


@notifications_app.command("list")
def notifications_list(
    status: Annotated[
        str | None, typer.Option(help="PENDING, SENT, FAILED, FAILED_PERMANENT, EXPIRED, …")
    ] = None,
    category: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
) -> None:
    """The newest messages, optionally by status or category."""
    from dispatchd.notifications import outbox

    async def work(db):
        async with db.read() as session:
            return await outbox.list_notifications(session, status=status, category=category, limit=limit)

    rows, total = _with_db(work)
    table = Table(
        "id", "created", "category", "recipient", "status", "attempts", "error", title=f"{total} messages"
    )
    for row in rows:
        table.add_row(
            row.id,
            row.created_at.isoformat(timespec="seconds"),
            row.category,
            row.recipient,
            row.status,
            str(row.attempts),
            (row.error_code or row.last_error or "")[:40],
        )
    console.print(table)


@notifications_app.command("health")
def notifications_health() -> None:
    """Backlog, due messages by category (count, oldest wait), messages held by pacing, last hour's outcomes,
    recent error codes and alerts (circuits: the API's health)."""
    import json

    from dispatchd.notifications import admin

    report = _with_db(lambda db: admin.health(db))
    console.print_json(json.dumps(report, default=str))


@notifications_app.command("summary")
def notifications_summary(
    since: Annotated[
        str | None,
        typer.Option(help="ISO 8601 with an offset, e.g. 2026-05-04T18:00:00Z; default: one hour ago"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON of /v1/notifications/summary")
    ] = False,
) -> None:
    """Messages written since T: by category and state, written → sent p50/p99, open ones past their
    expiry, and customer/admin messages never sent (exit code 1 when there are any)."""
    import json

    from dispatchd.notifications import report

    since_at = None
    if since is not None:
        try:
            since_at = datetime.fromisoformat(since)
        except ValueError:
            errors.print(f"[red]--since: not an ISO 8601 datetime: {since!r}[/]")
            raise typer.Exit(2) from None
        if since_at.tzinfo is None:
            errors.print("[red]--since needs an offset (Z or +01:00)[/]")
            raise typer.Exit(2)
    summary = _with_db(lambda db: report.outbox_summary(db, since_at))
    if as_json:
        console.print_json(json.dumps(summary, default=str))
    else:
        report.render(summary, console)
    if summary["must_deliver_unsent"]:
        raise typer.Exit(1)


console = Console()
errors = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        errors.print(f"[bold red]dispatchd cannot start:[/] {exc}")
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"dispatchd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Settings come from DISPATCHD_* environment variables (or .env); see docs/operations.md."""


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address [env DISPATCHD_HOST, default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [env DISPATCHD_PORT, default 8000]")] = None,
) -> None:
    """Migrate the database, then serve the API with the sweeper and the delivery worker."""
    import uvicorn

    from dispatchd.app import create_app
    from dispatchd.core.logging import configure_logging

    settings = _settings(host=host, port=port)
    configure_logging(settings.log_level, json=settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def migrate() -> None:
    """Apply the database migrations (also done by `serve` at start) and make sure an admin key exists."""
    from dispatchd.core.db import Database
    from dispatchd.migrate import current_revision, prepare_database

    settings = _settings()

    async def run() -> str | None:
        db = Database(settings.database_url)
        try:
            await prepare_database(db, settings)
            return await current_revision(db)
        finally:
            await db.dispose()

    revision = asyncio.run(run())
    console.print(f"database at revision [bold]{revision}[/]")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | integration | driver")],
    driver_id: Annotated[str | None, typer.Option(help="The driver this key acts for (role driver)")] = None,
    name: Annotated[str | None, typer.Option(help="A label, e.g. whose phone it is")] = None,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from dispatchd.core import auth
    from dispatchd.core.db import Database
    from dispatchd.core.errors import DispatchdError
    from dispatchd.matching.models import Driver

    settings = _settings()
    try:
        parsed_role = auth.Role(role)
    except ValueError:
        errors.print(f"[red]--role must be one of: {', '.join(r.value for r in auth.Role)}[/]")
        raise typer.Exit(2) from None

    async def run() -> tuple[str, str]:
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                if driver_id and await session.get(Driver, driver_id) is None:
                    raise DispatchdError(f"driver {driver_id} not found")
                row, plaintext = await auth.create_key(session, parsed_role, driver_id=driver_id, name=name)
                return row.id, plaintext
        finally:
            await db.dispose()

    try:
        key_id, plaintext = asyncio.run(run())
    except DispatchdError as exc:
        errors.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(1) from None
    console.print(
        f"key id: {key_id}\nrole:   {parsed_role.value}\nkey:    [bold]{plaintext}[/]  (shown once)"
    )


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (ids, roles, drivers; never the keys themselves)."""
    from dispatchd.core import auth
    from dispatchd.core.db import Database

    settings = _settings()

    async def run():
        db = Database(settings.database_url)
        try:
            async with db.read() as session:
                return await auth.list_keys(session)
        finally:
            await db.dispose()

    table = Table("id", "role", "driver", "name", "created", "revoked")
    for row in asyncio.run(run()):
        table.add_row(
            row.id,
            row.role,
            row.driver_id or "",
            row.name or "",
            row.created_at.isoformat(timespec="seconds"),
            row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_…), not the key")]) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from dispatchd.core import auth
    from dispatchd.core.db import Database
    from dispatchd.core.errors import NotFound

    settings = _settings()

    async def run() -> None:
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                await auth.revoke_key(session, key_id)
        finally:
            await db.dispose()

    try:
        asyncio.run(run())
    except NotFound as exc:
        errors.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(1) from None
    console.print(f"revoked {key_id}")


@resources_app.command("import")
def resources_import(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="CSV: type,name,capacity[,id,state,metadata]")
    ],
) -> None:
    """Validate every row, report errors with line numbers, and import all rows or none."""
    from dispatchd.core.db import Database
    from dispatchd.core.errors import DispatchdError
    from dispatchd.reservations.csvio import parse_resources
    from dispatchd.reservations.service import ReservationService

    settings = _settings()
    rows, problems = parse_resources(file)
    if problems:
        for problem in problems:
            errors.print(f"[red]{file}:{problem}[/]")
        errors.print(f"[bold red]{len(problems)} error(s); nothing imported.[/]")
        raise typer.Exit(1)

    async def run() -> int:
        db = Database(settings.database_url)
        try:
            return len(await ReservationService(db).import_resources(rows, actor="cli:resources-import"))
        finally:
            await db.dispose()

    try:
        count = asyncio.run(run())
    except DispatchdError as exc:
        errors.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(1) from None
    console.print(f"imported {count} resources")


@reservations_app.command("export")
def reservations_export(
    format_: Annotated[str, typer.Option("--format", help="Only csv for now")] = "csv",
    resource_id: Annotated[str | None, typer.Option(help="Only this resource's reservations")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write; default stdout")
    ] = None,
) -> None:
    """Write every reservation as CSV (id,resource_id,client_id,quantity,status,created_at,cancelled_at)."""
    import csv
    import sys

    from dispatchd.core.db import Database
    from dispatchd.reservations.csvio import EXPORT_COLUMNS, reservation_row
    from dispatchd.reservations.service import ReservationService

    if format_ != "csv":
        errors.print("[red]--format: only csv is supported[/]")
        raise typer.Exit(2)
    settings = _settings()

    async def run(handle) -> int:
        db = Database(settings.database_url)
        writer = csv.writer(handle)
        writer.writerow(EXPORT_COLUMNS)
        count = 0
        try:
            async for batch in ReservationService(db).iter_reservations(resource_id):
                writer.writerows(reservation_row(row) for row in batch)
                count += len(batch)
        finally:
            await db.dispose()
        return count

    if output is None:
        asyncio.run(run(sys.stdout))
    else:
        with output.open("w", newline="", encoding="utf-8") as handle:
            count = asyncio.run(run(handle))
        console.print(f"wrote {count} reservations to {output}")


@app.command("fake-whatsapp")
def fake_whatsapp(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")],
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of calls answered 503 (Meta 131000)")
    ] = 0.0,
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before every answer, ms")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the failure draw")] = None,
    pair_interval_s: Annotated[
        float,
        typer.Option(
            min=0, help="Refuse (400, Meta 131056) a message to a user served less than this ago; 0 = off"
        ),
    ] = 0.0,
) -> None:
    """Run a fake WhatsApp Cloud API for tests, benchmarks and `replay --fleet whatsapp`.

    Point a server at it with DISPATCHD_WHATSAPP_API_BASE_URL=http://HOST:PORT/v21.0. It records every
    accepted message (GET /messages?after=SEQ), counts calls (GET /stats) and forgets (POST /reset).
    """
    from dispatchd.testing.fake_whatsapp import serve as serve_fake

    console.print(f"fake WhatsApp Cloud API on http://{host}:{port} (base URL for dispatchd: …/v21.0)")
    serve_fake(
        port,
        host,
        fail_rate=fail_rate,
        latency_ms=latency_ms,
        seed=seed,
        pair_interval_s=pair_interval_s,
    )


def _default_trips() -> Path:
    return Path(__file__).parent / "data" / "nyc-2014-04-30-b02512.csv.gz"


@app.command()
def replay(
    trips: Annotated[
        Path | None,
        typer.Argument(
            help="Trips CSV or CSV.gz (pickup_at,lat,lon,base); default: the shipped NYC 2014-04-30 slice"
        ),
    ] = None,
    url: Annotated[str, typer.Option(help="Base URL of a running dispatchd")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="DISPATCHD_API_KEY", help="Admin or integration key")] = "",
    start: Annotated[
        datetime | None, typer.Option("--from", help="First pickup time to replay (trace local time)")
    ] = None,
    end: Annotated[datetime | None, typer.Option("--to", help="Replay pickups before this time")] = None,
    speed: Annotated[float, typer.Option(min=0.01, help="Trace seconds per real second")] = 60.0,
    drivers: Annotated[int, typer.Option(min=1, help="Simulated drivers")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed of the simulation")] = 7,
    accept_probability: Annotated[
        float, typer.Option(min=0, max=1, help="Share of answers that accept")
    ] = 0.8,
    ignore_probability: Annotated[
        float, typer.Option(min=0, max=1, help="Share of offers left unanswered")
    ] = 0.1,
    drain_timeout: Annotated[
        float, typer.Option(help="Real seconds to wait for open searches at the end")
    ] = 360.0,
    outbox_wait: Annotated[
        float,
        typer.Option(min=0, help="Real seconds to wait, after that, for customer/admin messages to be sent"),
    ] = 120.0,
    fleet: Annotated[
        str,
        typer.Option(
            help="events: drivers read offers from the event log; whatsapp: only what the outbox sent "
            "to the fake WhatsApp server, answered by signed webhook"
        ),
    ] = "events",
    whatsapp_fake_url: Annotated[
        str | None, typer.Option(help="Fake WhatsApp server (dispatchd fake-whatsapp), --fleet whatsapp")
    ] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(
            envvar="DISPATCHD_WHATSAPP_APP_SECRET",
            help="The server's WhatsApp app secret, to sign the drivers' taps (--fleet whatsapp)",
        ),
    ] = None,
) -> None:
    """Replay real pickups as bookings through the HTTP API, with simulated drivers answering offers.

    Prints a summary: bookings, assigned, timed out, time to assign p50/p95/p99, double assignments
    (must be 0), drivers holding two bookings (must be 0), notifications written, and the outbox:
    messages by category and state, written → sent p50/p99, peak backlog, customer/admin messages never
    sent (must be none). Exits 1 when one of the "must" fails.

    With --fleet whatsapp the server must send to the fake: DISPATCHD_NOTIFICATION_CHANNEL=whatsapp_cloud,
    DISPATCHD_WHATSAPP_API_BASE_URL=<fake url>/v21.0, an access token, a phone number id and
    DISPATCHD_WHATSAPP_APP_SECRET (see docs/operations.md).
    """
    from dispatchd.replay import ReplayOptions, run_replay

    if not api_key:
        errors.print("[red]--api-key (or DISPATCHD_API_KEY) is required: an admin or integration key[/]")
        raise typer.Exit(2)
    try:
        options = ReplayOptions(
            trips_path=trips or _default_trips(),
            url=url.rstrip("/"),
            api_key=api_key,
            start=start,
            end=end,
            speed=speed,
            drivers=drivers,
            seed=seed,
            accept_probability=accept_probability,
            ignore_probability=ignore_probability,
            drain_timeout_s=drain_timeout,
            outbox_wait_s=outbox_wait,
            fleet=fleet,
            whatsapp_fake_url=whatsapp_fake_url.rstrip("/") if whatsapp_fake_url else None,
            webhook_secret=webhook_secret,
        )
    except ValueError as exc:
        errors.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    summary = asyncio.run(run_replay(options, console))
    summary.render(console)
    if not summary.ok:  # aborted, a double assignment / double booking, or a customer/admin message unsent
        raise typer.Exit(1)
