"""Development and load tools: ``dispatchd fake-whatsapp``, ``dispatchd replay`` and
``dispatchd replay-conversations``."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from dispatchd.cli.common import console, errors


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
    from dispatchd.replay.trace import SHIPPED_TRIPS

    if not api_key:
        errors.print("[red]--api-key (or DISPATCHD_API_KEY) is required: an admin or integration key[/]")
        raise typer.Exit(2)
    try:
        options = ReplayOptions(
            trips_path=trips or SHIPPED_TRIPS,
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


def replay_conversations(
    trips: Annotated[
        Path | None,
        typer.Argument(
            help="Trips CSV or CSV.gz (pickup_at,lat,lon); default: the shipped NYC 2014-04-30 slice"
        ),
    ] = None,
    url: Annotated[str, typer.Option(help="Base URL of a running dispatchd")] = "http://127.0.0.1:8000",
    webhook_secret: Annotated[
        str,
        typer.Option(
            envvar="DISPATCHD_WHATSAPP_APP_SECRET",
            help="The server's WhatsApp app secret, to sign the customers' messages",
        ),
    ] = "",
    admin_key: Annotated[
        str, typer.Option(envvar="DISPATCHD_API_KEY", help="Admin key: creates the agents and their keys")
    ] = "",
    start: Annotated[
        datetime | None,
        typer.Option("--from", "--start", help="First pickup time to replay (trace local time)"),
    ] = None,
    end: Annotated[
        datetime | None, typer.Option("--to", "--end", help="Replay pickups before this time")
    ] = None,
    speed: Annotated[float, typer.Option(min=0.01, help="Trace seconds per real second")] = 60.0,
    agents: Annotated[int, typer.Option(min=1, help="Simulated agents")] = 10,
    capacity: Annotated[int, typer.Option(min=1, max=1000, help="Open conversations per agent")] = 10,
    agent_reply_delay_s: Annotated[
        tuple[float, float],
        typer.Option(help="An agent answers after MIN to MAX trace seconds (log-uniform)"),
    ] = (10.0, 180.0),
    presence_changes: Annotated[
        bool, typer.Option(help="Agents take breaks (OFFLINE) and come back (ONLINE) during the replay")
    ] = True,
    seed: Annotated[int, typer.Option(help="Random seed of the simulation")] = 7,
    drain_timeout: Annotated[
        float, typer.Option(min=0, help="Real seconds to wait at the end for every customer to be answered")
    ] = 300.0,
) -> None:
    """Replay real pickups as customers writing on WhatsApp (signed webhooks), answered by simulated agents.

    Each pickup is a customer's first message, followed by 1 to 4 follow-ups. Agents go ONLINE and
    OFFLINE over the API and answer their conversations after realistic delays. Prints time to assign and
    to first reply (p50/p95/p99), the pending peak, assignments per agent (max − min), lost messages and
    double-assigned conversations (both must be 0). Exits 1 when one of the "must" fails.

    The server needs DISPATCHD_WHATSAPP_APP_SECRET (the same value as --webhook-secret).
    """
    from dispatchd.replay.conversations import ConversationReplayOptions, run_conversation_replay
    from dispatchd.replay.trace import SHIPPED_TRIPS

    try:
        options = ConversationReplayOptions(
            url=url.rstrip("/"),
            webhook_secret=webhook_secret,
            admin_key=admin_key,
            trips_path=trips or SHIPPED_TRIPS,
            start=start,
            end=end,
            speed=speed,
            agents=agents,
            capacity=capacity,
            reply_delay_s=agent_reply_delay_s,
            presence_changes=presence_changes,
            seed=seed,
            drain_timeout_s=drain_timeout,
        )
    except ValueError as exc:
        errors.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    summary = asyncio.run(run_conversation_replay(options, console))
    summary.render(console)
    if not summary.ok:  # aborted, a message lost or refused, a conversation with two agents
        raise typer.Exit(1)
