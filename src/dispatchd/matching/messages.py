"""Message texts of seed 000 §5.2 and §7.1 (French, as the customers and drivers read them)."""

from __future__ import annotations

from datetime import datetime

from dispatchd.matching.models import Booking, Driver


def _when(value: datetime | None) -> str:
    return value.strftime("%d/%m/%Y %H:%M UTC") if value else "dès que possible"


def search_started(drivers_count: int) -> str:
    return (
        "🔍 *RECHERCHE DE CHAUFFEUR*\n\n"
        "Nous recherchons un chauffeur pour votre course...\n"
        f"{drivers_count} chauffeurs notifiés\n\n"
        "⏱️ Nous vous tiendrons informé dans les 5 minutes maximum."
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
        "*3* - Modifier l'horaire\n\n"
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
    distance = f"📏 À {distance_km:.1f} km de vous\n" if distance_km is not None else ""
    return (
        "🚕 *NOUVELLE COURSE*\n\n"
        f"📍 Départ: {booking.pickup_address}\n"
        f"🎯 Arrivée: {booking.drop_address}\n"
        f"⏰ Heure: {_when(booking.pickup_at)}\n"
        f"{distance}\n"
        f"Répondez ACCEPTER ou REFUSER dans les {offer_timeout_s:g} secondes.\n"
        f"Réf: {booking.id}"
    )


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
