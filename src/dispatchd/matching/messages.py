"""Every user-facing text of matching, in French as the customers and drivers read them: the messages
of seed 000 §5.2 and §7.1, the answer a driver's response gets (§2.2 ResponseResult.message), the offer's
reply buttons, and how a paced driver's open offers (or "course prise" notices) become one WhatsApp
message.

WhatsApp limits (Cloud API "Messages" reference): an interactive message has at most 3 reply buttons
(title ≤ 20 characters) or one list of at most 10 rows (title ≤ 24, description ≤ 72 characters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from dispatchd.matching.models import Booking, Driver
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.outbox import Combined

#: Offers one message carries at most (a WhatsApp list holds 10 rows); the farther ones wait their turn.
OFFERS_PER_MESSAGE_MAX = 10
#: Reply buttons per message (WhatsApp allows 3); more offers go in a list.
BUTTONS_MAX = 3
#: Notices one "courses prises" message names at most (the rest are counted).
NOTICES_LISTED_MAX = 15


#: The text of each ResponseResult action (keys are :class:`dispatchd.matching.types.Action` values).
ACTION_MESSAGES: dict[str, str] = {
    "ASSIGNED": "Course attribuée : elle est à vous.",
    "REJECTED": "Refus enregistré.",
    "ALREADY_TAKEN": "Course déjà prise par un autre chauffeur.",
    "BOOKING_CANCELLED": "Course annulée.",
    "OFFER_EXPIRED": "Offre expirée.",
    "DRIVER_BUSY": "Vous avez déjà une course en cours.",
}


def offer_buttons(booking_id: str) -> list[dict[str, str]]:
    """The two reply buttons of a single offer; a tap answers ``ACCEPT:<booking_id>`` or
    ``REJECT:<booking_id>`` (parsed by the WhatsApp webhook)."""
    return [
        {"id": f"ACCEPT:{booking_id}", "title": "ACCEPTER"},
        {"id": f"REJECT:{booking_id}", "title": "REFUSER"},
    ]


def _when(value: datetime | None) -> str:
    return value.strftime("%d/%m/%Y %H:%M UTC") if value else "dès que possible"


def search_started(drivers_count: int) -> str:
    return (
        "🔍 *RECHERCHE DE CHAUFFEUR*\n\n"
        "Nous recherchons un chauffeur pour votre course...\n"
        f"{drivers_count} chauffeurs notifiés\n\n"
        "⏱️ Nous vous tiendrons informé dans les 5 minutes maximum."
    )


def search_progress(wave: int, drivers_count: int, total_notified: int, radius_km: float | None) -> str:
    """Seed 000 §7.1 notifySearchProgress: the search widened (wave ``wave``, ``drivers_count`` more
    drivers, ``total_notified`` in all, radius in km when the search has one)."""
    radius = f" (rayon {radius_km:.1f} km)" if radius_km is not None else ""
    return (
        "🔎 *RECHERCHE ÉLARGIE*\n\n"
        f"Nous élargissons la recherche{radius} : {drivers_count} chauffeurs de plus notifiés, "
        f"{total_notified} au total.\n\n"
        "⏱️ Nous vous tenons informé."
    )


def driver_found(driver: Driver) -> str:
    return (
        "✅ *CHAUFFEUR TROUVÉ !*\n\n"
        f"🚗 **Chauffeur:** {driver.name}\n"
        f"📞 **Contact:** {driver.phone}\n"
        f"⭐ **Note:** {driver.rating:g}/5\n"
        f"🚗 **Véhicule:** {driver.vehicle_type} - {driver.vehicle_plate}\n\n"
        "Votre chauffeur vous contactera sous peu !"
    )


def search_failed() -> str:
    return (
        "❌ *AUCUN CHAUFFEUR DISPONIBLE*\n\n"
        "Malheureusement, aucun chauffeur n'est disponible actuellement pour votre course.\n\n"
        "🔄 **Options:**\n"
        "*1* - Réessayer maintenant\n"
        "*2* - Programmer plus tard  \n"
        "*3* - Annuler ma demande\n\n"
        "Nos équipes ont été alertées."
    )


def admin_timeout_alert(booking: Booking, search_timeout_s: float) -> str:
    minutes = round(search_timeout_s / 60)
    return (
        "🚨 *ALERTE ADMIN*\n\n"
        f"❌ Aucun chauffeur trouvé après {minutes} minutes\n\n"
        "📋 **Détails course:**\n"
        f"👤 Client: {booking.customer_name}\n"
        f"📞 Téléphone: {booking.customer_phone}\n"
        f"📍 Départ: {booking.pickup_address}\n"
        f"🎯 Arrivée: {booking.drop_address}\n"
        f"⏰ Heure prévue: {_when(booking.pickup_at)}\n\n"
        "🔍 **Actions suggérées:**\n"
        "- Contacter client pour proposer horaire alternatif\n"
        "- Vérifier disponibilité chauffeurs\n"
        "- Analyser demande dans zone\n\n"
        f"ID Course: {booking.id}"
    )


def driver_offer(booking: Booking, distance_km: float | None, offer_timeout_s: float) -> str:
    return driver_offers(booking, offer_timeout_s)(distance_km)


def driver_offers(booking: Booking, offer_timeout_s: float) -> Callable[[float | None], str]:
    """:func:`driver_offer` for one booking and many drivers: the booking's part is formatted once, the
    returned function adds each driver's distance (km, or None)."""
    head = (
        "🚕 *NOUVELLE COURSE*\n\n"
        f"📍 Départ: {booking.pickup_address}\n"
        f"🎯 Arrivée: {booking.drop_address}\n"
        f"⏰ Heure: {_when(booking.pickup_at)}\n"
    )
    tail = f"\nRépondez ACCEPTER ou REFUSER dans les {offer_timeout_s:g} secondes.\nRéf: {booking.id}"
    unknown = head + tail

    def body(distance_km: float | None) -> str:
        if distance_km is None:
            return unknown
        return f"{head}📏 À {distance_km:.1f} km de vous\n{tail}"

    return body


def booking_taken(booking: Booking) -> str:
    return (
        "ℹ️ *COURSE PRISE*\n\n"
        f"La course {booking.pickup_address} → {booking.drop_address} a été prise par un autre chauffeur."
    )


def booking_cancelled_driver(booking: Booking) -> str:
    return (
        f"🚫 *COURSE ANNULÉE*\n\nLa course {booking.pickup_address} → {booking.drop_address} a été annulée."
    )


def booking_cancelled_customer(booking: Booking) -> str:
    return (
        f"🚫 *COURSE ANNULÉE*\n\nVotre course {booking.pickup_address} → {booking.drop_address} est annulée."
    )


def trip_line(booking: Booking) -> str:
    """``"<pickup> → <drop>"``: how a booking is named in a list."""
    return f"{booking.pickup_address} → {booking.drop_address}"


def _distance(km: float | None) -> str:
    return f"{km:.1f} km" if km is not None else "distance inconnue"


def combine_offers(offers: Sequence[OutboundMessage]) -> Combined:
    """One message for a driver's open offers: the nearest first (then the oldest), at most
    :data:`OFFERS_PER_MESSAGE_MAX`; one ACCEPTER button per offer up to 3, else a list. Each offer's
    ``payload`` holds ``booking_id``, ``trip`` and ``distance_km`` (see ``MatchingService``); the tap
    answers ``ACCEPT:<booking_id>`` as a single offer's button does."""
    ranked = sorted(
        enumerate(offers),
        key=lambda item: (
            (item[1].payload or {}).get("distance_km") is None,
            (item[1].payload or {}).get("distance_km") or 0.0,
            item[0],
        ),
    )
    chosen = [offer for _, offer in ranked[:OFFERS_PER_MESSAGE_MAX]]
    lines = []
    choices = []
    for number, offer in enumerate(chosen, start=1):
        data = offer.payload or {}
        distance = _distance(data.get("distance_km"))
        lines.append(f"{number}. 📍 {data.get('trip', '')} · {distance}")
        choices.append((f"ACCEPT:{data.get('booking_id')}", number, distance, str(data.get("trip", ""))))
    body = (
        f"🚕 *{len(chosen)} COURSES DISPONIBLES*\n\n"
        + "\n".join(lines)
        + "\n\nLa première acceptation l'emporte : touchez ACCEPTER pour la course choisie."
    )
    payload: dict = {"booking_ids": [(offer.payload or {}).get("booking_id") for offer in chosen]}
    if len(choices) <= BUTTONS_MAX:
        payload["buttons"] = [{"id": id_, "title": f"ACCEPTER {number}"} for id_, number, _, _ in choices]
    else:
        payload["list"] = {
            "button": "Choisir une course",
            "rows": [
                {"id": id_, "title": f"{number}. {distance}"[:24], "description": trip[:72]}
                for id_, number, distance, trip in choices
            ],
        }
    return Combined(tuple(offer.id for offer in chosen), body, payload)


def combine_taken(notices: Sequence[OutboundMessage]) -> Combined:
    """One "courses prises" message for a driver's queued notices (each ``payload["trip"]``)."""
    trips = [str((notice.payload or {}).get("trip", "")) for notice in notices]
    listed = "\n".join(f"- {trip}" for trip in trips[:NOTICES_LISTED_MAX])
    more = len(trips) - NOTICES_LISTED_MAX
    tail = f"\n… et {more} autres" if more > 0 else ""
    body = f"ℹ️ *COURSES PRISES*\n\nPrises par d'autres chauffeurs :\n{listed}{tail}"
    return Combined(tuple(notice.id for notice in notices), body, {})


def no_open_offer() -> str:
    """The reply to a typed ACCEPTER / REFUSER from a driver with no open offer."""
    return "Aucune course ne vous est proposée en ce moment : votre réponse n'a rien changé."


def several_open_offers(count: int) -> str:
    """The reply to a typed ACCEPTER / REFUSER when ``count`` (≥ 2) offers are open: which one?"""
    return (
        f"{count} courses vous sont proposées en ce moment : touchez ACCEPTER ou REFUSER sous celle "
        "que vous choisissez."
    )


def search_later() -> str:
    """The reply to a customer's *2* after "aucun chauffeur disponible"."""
    return "C'est noté. Écrivez-nous quand vous souhaitez reprogrammer votre course."


def request_dropped() -> str:
    """The reply to a customer's *3* after "aucun chauffeur disponible"."""
    return "C'est noté : votre demande est annulée. À bientôt."
