"""``dispatchd resources import`` and ``dispatchd reservations export``: bulk operations (seed 003)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dispatchd.cli.common import console, errors, settings, with_db

resources_app = typer.Typer(help="Bulk operations on resources (seed 003).", no_args_is_help=True)
reservations_app = typer.Typer(help="Bulk operations on reservations (seed 003).", no_args_is_help=True)


@resources_app.command("import")
def resources_import(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="CSV: type,name,capacity[,id,state,metadata]")
    ],
) -> None:
    """Validate every row, report errors with line numbers, and import all rows or none."""
    from dispatchd.core.errors import DispatchdError
    from dispatchd.reservations.csvio import parse_resources
    from dispatchd.reservations.service import ReservationService

    config = settings()
    rows, problems = parse_resources(file)
    if problems:
        for problem in problems:
            errors.print(f"[red]{file}:{problem}[/]")
        errors.print(f"[bold red]{len(problems)} error(s); nothing imported.[/]")
        raise typer.Exit(1)

    async def run(db) -> int:
        return len(await ReservationService(db).import_resources(rows, actor="cli:resources-import"))

    try:
        count = with_db(run, config)
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

    from dispatchd.reservations.csvio import EXPORT_COLUMNS, reservation_row
    from dispatchd.reservations.service import ReservationService

    if format_ != "csv":
        errors.print("[red]--format: only csv is supported[/]")
        raise typer.Exit(2)
    config = settings()

    def export(handle):
        async def run(db) -> int:
            writer = csv.writer(handle)
            writer.writerow(EXPORT_COLUMNS)
            count = 0
            async for batch in ReservationService(db).iter_reservations(resource_id):
                writer.writerows(reservation_row(row) for row in batch)
                count += len(batch)
            return count

        return with_db(run, config)

    if output is None:
        export(sys.stdout)
    else:
        with output.open("w", newline="", encoding="utf-8") as handle:
            count = export(handle)
        console.print(f"wrote {count} reservations to {output}")
