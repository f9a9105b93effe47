"""``dispatchd keys create|list|revoke``: API keys (only their SHA-256 hash is stored)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dispatchd.cli.common import console, errors, settings, with_db

app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | integration | driver | agent")],
    driver_id: Annotated[str | None, typer.Option(help="The driver this key acts for (role driver)")] = None,
    agent_id: Annotated[str | None, typer.Option(help="The agent this key acts for (role agent)")] = None,
    name: Annotated[str | None, typer.Option(help="A label, e.g. whose phone it is")] = None,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from dispatchd.core import auth
    from dispatchd.core.errors import DispatchdError
    from dispatchd.core.rows import get_or_404
    from dispatchd.dispatcher.models import Agent
    from dispatchd.matching.models import Driver

    config = settings()
    try:
        parsed_role = auth.Role(role)
    except ValueError:
        errors.print(f"[red]--role must be one of: {', '.join(r.value for r in auth.Role)}[/]")
        raise typer.Exit(2) from None

    async def create(db) -> tuple[str, str]:
        async with db.transaction() as session:
            if driver_id:
                await get_or_404(session, Driver, driver_id, code="DRIVER_NOT_FOUND", what="driver")
            if agent_id:
                await get_or_404(session, Agent, agent_id, code="AGENT_NOT_FOUND", what="agent")
            subject = f"agent:{agent_id}" if agent_id else None
            row, plaintext = await auth.create_key(
                session, parsed_role, driver_id=driver_id, subject=subject, name=name
            )
            return row.id, plaintext

    try:
        key_id, plaintext = with_db(create, config)
    except DispatchdError as exc:
        errors.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(1) from None
    console.print(
        f"key id: {key_id}\nrole:   {parsed_role.value}\nkey:    [bold]{plaintext}[/]  (shown once)"
    )


@app.command("list")
def keys_list() -> None:
    """List API keys (ids, roles, subjects; never the keys themselves)."""
    from dispatchd.core import auth

    async def read(db):
        async with db.read() as session:
            return await auth.list_keys(session)

    table = Table("id", "role", "subject", "name", "created", "revoked")
    for row in with_db(read):
        table.add_row(
            row.id,
            row.role,
            row.subject or "",
            row.name or "",
            row.created_at.isoformat(timespec="seconds"),
            row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "",
        )
    console.print(table)


@app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_…), not the key")]) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from dispatchd.core import auth
    from dispatchd.core.errors import NotFound

    async def revoke(db) -> None:
        async with db.transaction() as session:
            await auth.revoke_key(session, key_id)

    try:
        with_db(revoke)
    except NotFound as exc:
        errors.print(f"[red]{exc.detail}[/]")
        raise typer.Exit(1) from None
    console.print(f"revoked {key_id}")
