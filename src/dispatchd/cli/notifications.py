"""``dispatchd notifications retry|list|health [--check]|summary``: the outbox, from the operator's side
(seed 004 §3 "Commande Retry", §4.2 "Vérification santé", "Monitoring")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.table import Table

from dispatchd.cli.common import console, errors, settings, with_db

app = typer.Typer(help="Inspect and retry outgoing messages (seed 004).", no_args_is_help=True)


@app.command("retry")
def notifications_retry(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be retried, change nothing")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="One block per message")] = False,
    now: Annotated[
        bool, typer.Option("--now", help="Make every failed message due now, ignoring its backoff")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many messages")] = 100,
    max_retries: Annotated[int, typer.Option(min=1, help="Skip messages with this many attempts")] = 10,
) -> None:
    """Failed (temporary) messages whose backoff has passed are queued for the delivery worker (seed 004
    §3); with --now, every failed message is made due now."""
    from dispatchd.core.phone import mask_phones
    from dispatchd.notifications import admin

    config = settings()
    started = datetime.now(ZoneInfo(config.timezone))
    found = with_db(
        lambda db: admin.retry_failed(db, limit=limit, max_retries=max_retries, dry_run=dry_run, now=now),
        config,
    )
    queued = 0 if dry_run else len(found)
    rule = "=" * 60
    console.print(f"{rule}\n🔄 RETRY NOTIFICATIONS ÉCHOUÉES{' (simulation)' if dry_run else ''}\n{rule}\n")
    console.print(f"📊 Notifications trouvées : {len(found)}")
    console.print(f"📅 Date/Heure actuelle : {started.strftime('%d/%m/%Y %H:%M:%S')} ({config.timezone})")
    console.print(f"🔢 Limite de tentatives : {max_retries}")
    console.print(
        "⏩ Mode : immédiat (--now), backoff ignoré"
        if now
        else "⏳ Mode : backoff respecté (seules les notifications dont la tentative est due)"
    )
    console.print(rule)
    for item in found:
        due = (
            item.next_attempt_at.astimezone(started.tzinfo).strftime("%d/%m/%Y %H:%M")
            if item.next_attempt_at
            else "-"
        )
        outcome = "➡️  serait mise en file" if dry_run else f"✅ mise en file (tentative {item.attempts + 1})"
        recipient = mask_phones(item.recipient)
        if verbose:
            console.print(
                f"\n📧 Notification {item.id}\n   Destinataire: {recipient}\n"
                f"   Tentatives: {item.attempts}/{max_retries}\n   Prochaine tentative prévue: {due}\n"
                f"   Catégorie: {item.category}\n   Dernière erreur: {item.last_error or '-'}\n   {outcome}",
                highlight=False,
            )
        else:
            console.print(
                f"📧 {item.id} · {recipient} · {item.category} · tentatives {item.attempts}/{max_retries}"
                f" · prévue {due} · {outcome}",
                highlight=False,
            )
    console.print(f"\n{rule}\n📊 RÉSUMÉ DE L'EXÉCUTION\n{rule}")
    console.print(f"Total traité       : {len(found)}")
    console.print(f"Mises en file      : {queued}\n")
    console.print(f"✅ {queued} notification(s) mise(s) en file d'attente pour envoi asynchrone")


@app.command("list")
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

    rows, total = with_db(work)
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


@app.command("health")
def notifications_health(
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Also evaluate the alert rules and send those due (the seed's cron fallback); "
            "exit 1 when one holds",
        ),
    ] = False,
) -> None:
    """Backlog, due messages by category, messages held by pacing, failed messages, last hour's and last
    24 h's outcomes (success rate, failed attempts by error class), recent error codes and alerts
    (circuits: the API's health). With --check, ``check`` lists the rules that hold and those sent."""
    import json

    from dispatchd.notifications import admin
    from dispatchd.notifications.alerts import describe

    config = settings()

    async def work(db):
        report = await admin.health(db)
        if check:
            from dispatchd.assembly import build_services

            services = build_services(config)
            try:
                monitor = services.alerts
                # the sweeper and the circuits live in the server's memory: their rules run there
                monitor.sweeper = None
                result = await monitor.check()
            finally:
                await services.aclose()
            report["check"] = {
                "alerts": [describe(alert) for alert in result.holding],
                "sent": [alert.rule for alert in result.sent],
            }
        return report

    try:
        report = with_db(work, config)
    except Exception as exc:  # an unreachable database is a failed check, said plainly
        errors.print(f"[red]notifications health failed: {type(exc).__name__}[/]")
        raise typer.Exit(2) from None
    console.print_json(json.dumps(report, default=str))
    if check and report["check"]["alerts"]:
        raise typer.Exit(1)


@app.command("summary")
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
    summary = with_db(lambda db: report.outbox_summary(db, since_at))
    if as_json:
        console.print_json(json.dumps(summary, default=str))
    else:
        report.render(summary, console)
    if summary["must_deliver_unsent"]:
        raise typer.Exit(1)
