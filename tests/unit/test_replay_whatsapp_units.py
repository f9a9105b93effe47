"""Unit tests for the replay's WhatsApp fleet and outbox summary pieces (no server, no network).

The messages parsed here are built by the real channel (``whatsapp_cloud.build_payload``) and, for
coalesced offers, by matching's ``combine_offers``: what the fake receives from a server. The taps are
checked against the server's own webhook code (``verify_signature``, ``parse_delivery``) and the key
layout of Meta's payloads in ``tests/data/whatsapp``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dispatchd.core.errors import Forbidden
from dispatchd.matching.inbound import OFFER_BUTTON
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.channels.whatsapp_cloud import build_payload
from dispatchd.notifications.webhooks import parse_delivery, verify_signature
from dispatchd.replay import (
    SHIPPED_TRIPS,
    OfferChoice,
    ReplayOptions,
    ReplaySummary,
    WhatsAppOffer,
    choose_reply,
    offers_in_message,
    sign_webhook,
    webhook_reply_payload,
)
from tests.unit.test_replay_units import _summary as replay_summary

DATA = Path(__file__).resolve().parents[1] / "data" / "whatsapp"
B1, B2, B3, B4 = "bkg_0a1b", "bkg_2c3d", "bkg_4e5f", "bkg_6a7b"


def sent(message: OutboundMessage, seq: int = 1) -> dict[str, Any]:
    """What the fake records for ``message``: the request JSON plus seq, at, wamid, phone_number_id."""
    return {**build_payload(message), "seq": seq, "at": 1.0, "wamid": f"wamid.{seq}", "phone_number_id": "42"}


def single_offer(booking_id: str = B1) -> OutboundMessage:
    return OutboundMessage(
        "ntf_1",
        "+12125550001",
        "driver_offer",
        "Nouvelle course",
        {
            "booking_id": booking_id,
            "buttons": [
                {"id": f"ACCEPT:{booking_id}", "title": "ACCEPTER"},
                {"id": f"REJECT:{booking_id}", "title": "REFUSER"},
            ],
        },
    )


def test_a_single_offer_has_an_accept_and_a_reject_button() -> None:
    offer = offers_in_message(sent(single_offer()))
    assert offer == WhatsAppOffer(
        to="12125550001",
        wamid="wamid.1",
        kind="button",
        choices=(OfferChoice(B1, f"ACCEPT:{B1}", "ACCEPTER", f"REJECT:{B1}", "REFUSER"),),
        phone_number_id="42",
    )


def test_a_list_message_gives_its_rows_in_order() -> None:
    rows = [
        {"id": f"ACCEPT:{b}", "title": f"{n}. 1.{n} km", "description": "A → B"}
        for n, b in enumerate([B3, B1, B4, B2], 1)
    ]
    message = OutboundMessage(
        "ntf_2", "+12125550002", "driver_offer", "4 courses", {"list": {"button": "Choisir", "rows": rows}}
    )
    offer = offers_in_message(sent(message))
    assert offer is not None and offer.kind == "list"
    assert [c.booking_id for c in offer.choices] == [B3, B1, B4, B2]
    assert offer.choices[0] == OfferChoice(B3, f"ACCEPT:{B3}", "1. 1.1 km")
    assert all(choice.reject_id is None for choice in offer.choices)


@pytest.mark.parametrize("count", [2, 3, 5, 10])
def test_coalesced_offers_as_the_server_builds_them_nearest_first(count: int) -> None:
    from dispatchd.matching.messages import combine_offers

    bookings = [f"bkg_{n:04x}" for n in range(count)]
    distances = [float(count - n) for n in range(count)]  # the last written is the nearest
    rows = [
        OutboundMessage(
            f"ntf_{n}",
            "+12125550003",
            "driver_offer",
            "offre",
            {"booking_id": b, "trip": f"A{n} → B{n}", "distance_km": d, "buttons": []},
        )
        for n, (b, d) in enumerate(zip(bookings, distances, strict=True))
    ]
    combined = combine_offers(rows)
    carrier = OutboundMessage(
        combined.ids[0], "+12125550003", "driver_offer", combined.body, combined.payload
    )
    offer = offers_in_message(sent(carrier))
    assert offer is not None
    assert offer.kind == ("button" if count <= 3 else "list")
    assert [c.booking_id for c in offer.choices] == list(reversed(bookings))
    assert all(OFFER_BUTTON.match(c.accept_id) for c in offer.choices)


def test_messages_without_an_offer_are_not_offers() -> None:
    text = OutboundMessage("ntf_3", "+12125550004", "customer_driver_found", "Chauffeur trouvé")
    assert offers_in_message(sent(text)) is None
    template = OutboundMessage(
        "ntf_4", "+12125550004", "driver_offer", "x", None, template={"name": "offer", "language": "fr"}
    )
    assert offers_in_message(sent(template)) is None
    other_buttons = OutboundMessage(
        "ntf_5", "+12125550004", "survey", "Note ?", {"buttons": [{"id": "RATE:5", "title": "5"}]}
    )
    assert offers_in_message(sent(other_buttons)) is None
    only_reject = OutboundMessage(
        "ntf_6", "+12125550004", "driver_offer", "x", {"buttons": [{"id": f"REJECT:{B1}", "title": "NON"}]}
    )
    assert offers_in_message(sent(only_reject)) is None
    assert offers_in_message({"type": "interactive", "interactive": "garbage"}) is None


def test_choose_reply_accepts_the_first_open_offer_or_refuses_or_leaves_it() -> None:
    single = offers_in_message(sent(single_offer()))
    assert single is not None
    assert choose_reply(single, accept=True) == ("ACCEPT", f"ACCEPT:{B1}", "ACCEPTER", B1)
    assert choose_reply(single, accept=False) == ("REJECT", f"REJECT:{B1}", "REFUSER", B1)
    assert choose_reply(single, accept=True, closed={B1}) is None

    several = WhatsAppOffer(
        "12125550005",
        "wamid.9",
        "button",
        tuple(OfferChoice(b, f"ACCEPT:{b}", f"ACCEPTER {n}") for n, b in enumerate([B2, B1, B3], 1)),
    )
    assert choose_reply(several, accept=True) == ("ACCEPT", f"ACCEPT:{B2}", "ACCEPTER 1", B2)
    assert choose_reply(several, accept=True, closed=[B2]) == ("ACCEPT", f"ACCEPT:{B1}", "ACCEPTER 2", B1)
    assert choose_reply(several, accept=False) is None  # no REFUSER button: a busy driver lets it go


def _keys(value: Any) -> Any:
    """The key layout of a JSON value (dicts → their keys, recursively; lists → their first item)."""
    if isinstance(value, dict):
        return {key: _keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_keys(value[0])] if value else []
    return None


@pytest.mark.parametrize(
    ("reply_kind", "sample_file", "case"),
    [
        ("button_reply", "callback_button.json", "button"),
        ("list_reply", "callback_selection.json", "callback"),
    ],
)
def test_a_tap_is_a_signed_meta_delivery_the_server_reads(
    reply_kind: str, sample_file: str, case: str
) -> None:
    payload = webhook_reply_payload(
        from_wa_id="12125550006",
        reply_kind=reply_kind,  # type: ignore[arg-type]
        reply_id=f"ACCEPT:{B1}",
        title="ACCEPTER",
        wamid="wamid.replay1",
        timestamp=1_746_000_000,
        context_wamid="wamid.offer",
        phone_number_id="42",
        profile_name="Driver 006",
    )
    meta = json.loads((DATA / sample_file).read_text())[case]
    ours, theirs = _keys(payload), _keys(meta)
    value, meta_value = ours["entry"][0]["changes"][0]["value"], theirs["entry"][0]["changes"][0]["value"]
    assert set(ours) == set(theirs) and set(value) == set(meta_value)
    assert value["messages"] == meta_value["messages"]  # same message layout, context included
    assert value["metadata"] == meta_value["metadata"]

    body = json.dumps(payload).encode()
    signature = sign_webhook("app-secret", body)
    assert signature.startswith("sha256=") and len(signature) == len("sha256=") + 64
    verify_signature(b"app-secret", body, signature)
    with pytest.raises(Forbidden):
        verify_signature(b"another-secret", body, signature)
    with pytest.raises(Forbidden):
        verify_signature(b"app-secret", body + b" ", signature)

    statuses, [inbound] = parse_delivery(json.loads(body))
    assert statuses == []
    assert (inbound.from_phone, inbound.type, inbound.button_id) == (
        "+12125550006",
        "interactive",
        f"ACCEPT:{B1}",
    )
    assert (inbound.wamid, inbound.context_message_id) == ("wamid.replay1", "wamid.offer")
    assert OFFER_BUTTON.match(inbound.button_id or "")


def test_whatsapp_fleet_options_need_the_fake_and_the_secret() -> None:
    common: dict[str, Any] = {
        "trips_path": SHIPPED_TRIPS,
        "url": "http://127.0.0.1:8000",
        "api_key": "k",
        "start": None,
        "end": None,
        "speed": 20,
        "drivers": 10,
    }
    assert ReplayOptions(**common).fleet == "events"
    assert ReplayOptions(**common).outbox_wait_s == 120.0
    fleet = ReplayOptions(**common, fleet="whatsapp", whatsapp_fake_url="http://f", webhook_secret="s")
    assert fleet.fleet == "whatsapp"
    with pytest.raises(ValueError, match="whatsapp_fake_url"):
        ReplayOptions(**common, fleet="whatsapp", webhook_secret="s")
    with pytest.raises(ValueError, match="whatsapp_fake_url"):
        ReplayOptions(**common, fleet="whatsapp", whatsapp_fake_url="http://f")
    with pytest.raises(ValueError, match="fleet"):
        ReplayOptions(**common, fleet="sms")
    with pytest.raises(ValueError, match="outbox_wait_s"):
        ReplayOptions(**common, outbox_wait_s=-1)


def _summary(**overrides: Any) -> ReplaySummary:
    """Every booking assigned and completed, unless overridden."""
    values: dict[str, Any] = {
        "assigned": 3,
        "completed": 3,
        "timed_out": 0,
        "offers_accepted": 3,
        "offers_rejected": 1,
    }
    return replay_summary(**{**values, **overrides})


OUTBOX = {
    "since": "2026-05-04T18:00:00+00:00",
    "at": "2026-05-04T18:05:00+00:00",
    "by_category": {
        "customer_driver_found": {"SENT": 3},
        "driver_offer": {"SENT": 4, "CANCELLED": 1, "EXPIRED": 1},
    },
    "latency_s": {
        "customer_driver_found": {"sent": 3, "p50": 0.42, "p99": 6.31, "max": 6.4},
        "driver_offer": {"sent": 4, "p50": 3.1, "p99": 12.5, "max": 12.9},
    },
    "open": 0,
    "open_past_expiry": 0,
    "must_deliver_unsent": {},
}


def test_ok_fails_when_a_customer_or_admin_message_was_never_sent() -> None:
    assert _summary().ok  # outbox unread (an older server): not held against the run
    assert _summary(outbox=OUTBOX).ok
    unsent = {**OUTBOX, "must_deliver_unsent": {"admin_alert": 2}}
    assert _summary(outbox=unsent).must_deliver_unsent == {"admin_alert": 2}
    assert not _summary(outbox=unsent).ok
    assert not _summary(outbox=OUTBOX, double_assignments=1).ok


def test_render_shows_the_outbox_and_the_whatsapp_fleet() -> None:
    console = Console(record=True, width=160)
    _summary(
        outbox={**OUTBOX, "must_deliver_unsent": {"admin_alert": 2}},
        peak_backlog=417,
        fleet="whatsapp",
        whatsapp_messages_seen=40,
        whatsapp_offers_seen=75,
        taps_sent={"ACCEPT": 5, "REJECT": 7},
        pair_limit_hits=3,
    ).render(console)
    text = console.export_text()
    for expected in (
        "peak outbox backlog",
        "417",
        "offers seen on WhatsApp",
        "75",
        "5 / 7",
        "pair-limit hits at the fake",
        "customer_driver_found",
        "6.31",
        "12.50",
        "never sent: admin_alert 2",
    ):
        assert expected in text, expected

    events = Console(record=True, width=160)
    _summary().render(events)
    plain = events.export_text()
    assert "offers seen on WhatsApp" not in plain and "outbox summary unreadable" in plain
    assert _summary(outbox=OUTBOX).as_dict()["outbox"]["by_category"]["driver_offer"]["CANCELLED"] == 1


def test_cli_refuses_a_whatsapp_fleet_without_its_fake_or_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dispatchd.cli import app as cli

    monkeypatch.delenv("DISPATCHD_WHATSAPP_APP_SECRET", raising=False)
    runner = CliRunner()
    missing = runner.invoke(cli, ["replay", "--api-key", "k", "--fleet", "whatsapp"])
    assert missing.exit_code == 2 and "whatsapp_fake_url" in missing.output
    unknown = runner.invoke(cli, ["replay", "--api-key", "k", "--fleet", "sms"])
    assert unknown.exit_code == 2 and "fleet must be one of" in unknown.output
