"""The ``dispatchd`` command line (Typer): serve, worker, migrate, keys, resources, reservations,
notifications, reports, fake-whatsapp, replay.

``app`` is the console script (``dispatchd = "dispatchd.cli:app"``) and what ``python -m dispatchd``
runs. Commands live by group: :mod:`~dispatchd.cli.server` (serve, migrate), :mod:`~dispatchd.cli.worker`
(worker), :mod:`~dispatchd.cli.keys`, :mod:`~dispatchd.cli.reservations` (resources import, reservations
export), :mod:`~dispatchd.cli.notifications`, :mod:`~dispatchd.cli.reports`, :mod:`~dispatchd.cli.devtools`
(fake-whatsapp, replay). Every command that opens the database goes through
:func:`dispatchd.cli.common.with_db`. Exit codes: 0 done, 1 refused or failed (the reason on stderr), 2 bad
settings or options.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dispatchd import __version__
from dispatchd.cli import devtools, keys, notifications, reports, reservations, server, worker
from dispatchd.cli.common import console

app = typer.Typer(
    help="dispatchd: a self-hosted dispatch engine for businesses that run on WhatsApp.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(server.serve)
app.command()(worker.worker)
app.command()(server.migrate)
app.command("fake-whatsapp")(devtools.fake_whatsapp)
app.command()(devtools.replay)
app.command("replay-conversations")(devtools.replay_conversations)
app.add_typer(keys.app, name="keys")
app.add_typer(reservations.resources_app, name="resources")
app.add_typer(reservations.reservations_app, name="reservations")
app.add_typer(notifications.app, name="notifications")
app.add_typer(reports.app, name="reports")


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


__all__ = ["app", "main"]
