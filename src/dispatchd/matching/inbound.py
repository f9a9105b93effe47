"""Matching's handlers of inbound WhatsApp messages, offered each message in this order by the inbox
(:mod:`dispatchd.notifications.inbox`), inside its claim transaction:

1. ``matching.offer_button``: a driver's tap on an offer's reply button, ``ACCEPT:<booking_id>`` or
   ``REJECT:<booking_id>`` (seed 000 §2.3 handleDriverResponse).
2. ``matching.typed_answer``: a known driver who types ACCEPTER / REFUSER (or oui / non; case, accents
   and punctuation ignored). With exactly one open offer whose message the driver received (or a reply
   quoting one), it answers that offer; with none or several, the driver gets a clear reply and nothing
   is decided.
3. ``matching.customer_answer``: a customer's 1 / 2 / 3 after "aucun chauffeur disponible" (seed 000
   §4 "proposer de relancer"), within 24 h and once: 1 = a new booking with the same trip and a new
   search, 2 = later (acknowledged), 3 = the request is dropped (acknowledged).

Anything else passes on to the next domain's handlers.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import timedelta

from sqlalchemy import literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, topics
from dispatchd.core.db import lock_for_update
from dispatchd.core.errors import DispatchdError
from dispatchd.core.inbound import Inbound
from dispatchd.matching import messages
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, Driver, OfferResponse
from dispatchd.matching.service import MatchingService
from dispatchd.matching.types import Category
from dispatchd.notifications import outbox
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message

#: Reply-button ids of driver offers (:func:`messages.offer_buttons`): ``ACCEPT:bkg_…`` / ``REJECT:bkg_…``.
OFFER_BUTTON = re.compile(r"^(ACCEPT|REJECT):(bkg_[0-9a-f]+)$")

#: Typed answers of a driver, normalised (:func:`normalise`).
TYPED_ANSWERS = {"accepter": "ACCEPT", "oui": "ACCEPT", "refuser": "REJECT", "non": "REJECT"}

#: A customer's choice after a search timed out, and what is recorded on the booking.
CUSTOMER_CHOICES = {"1": "RELAUNCHED", "2": "LATER", "3": "CANCELLED"}

#: How long after a timeout the customer's 1/2/3 still counts (WhatsApp's customer service window).
CUSTOMER_ANSWER_WINDOW = timedelta(hours=24)

#: An offer seen and expired this recently may still be what a bare "oui" answers.
RECENTLY_EXPIRED = timedelta(seconds=15)

#: A reply about an answer is useless after this long.
REPLY_TTL = timedelta(minutes=5)


def normalise(text: str | None) -> str:
    """``" Accepter ! "`` → ``"accepter"``; ``"REFUSÉ"`` → ``"refuse"``: accents, case, surrounding
    spaces and punctuation removed."""
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(char for char in decomposed if not unicodedata.combining(char))
    return letters.casefold().strip().strip(".!?,;:*_~ ").strip()


async def _driver_id(session: AsyncSession, phone: str) -> str | None:
    return await session.scalar(select(Driver.id).where(Driver.phone == phone))


def _reply(message: Inbound, category: str, body: str, now) -> Message:
    return Message(
        recipient=message.from_phone,
        category=category,
        body=body,
        subject=f"inbound:{message.id}",
        expires_at=now + REPLY_TTL,
    )


class OfferButton:
    """``matching.offer_button``: outcome is the :class:`~dispatchd.matching.types.Action` of the answer,
    ``UNKNOWN_DRIVER`` for a phone that is no driver's, or the error code (``OFFER_NOT_FOUND``…)."""

    name = "matching.offer_button"

    def __init__(self, service: MatchingService) -> None:
        self.service = service

    async def route(self, session: AsyncSession, message: Inbound) -> str | None:
        button = OFFER_BUTTON.match(message.button_id or "")
        if button is None:
            return None
        driver_id = await _driver_id(session, message.from_phone)
        if driver_id is None:
            return "UNKNOWN_DRIVER"
        try:
            result = await self.service.respond_in(session, button.group(2), driver_id, button.group(1))
        except DispatchdError as exc:  # BOOKING_NOT_FOUND, OFFER_NOT_FOUND: the tap is answered, not retried
            return exc.code
        return result.action.value


class TypedAnswer:
    """``matching.typed_answer``: the answer's action when it names one offer the driver has seen, else
    ``NO_OPEN_OFFER`` or ``AMBIGUOUS`` (with a reply to the driver). Not a driver, or not an answer:
    passes.

    Only offers whose WhatsApp message reached the provider count (an offer still queued behind the
    driver's 6 s pacing slot was never seen). A reply quoting an offer's message answers that offer. An
    offer seen and expired in the last :data:`RECENTLY_EXPIRED` makes a bare "oui" ambiguous: it may
    have been meant for it."""

    name = "matching.typed_answer"

    def __init__(self, service: MatchingService) -> None:
        self.service = service

    async def route(self, session: AsyncSession, message: Inbound) -> str | None:
        if message.button_id is not None:
            return None
        answer = TYPED_ANSWERS.get(normalise(message.text))
        if answer is None:
            return None
        driver_id = await _driver_id(session, message.from_phone)
        if driver_id is None:
            return None
        now = session.info["now"]
        seen = await _seen_offer_messages(session, message.from_phone, now - RECENTLY_EXPIRED)
        open_ids = [offer.booking_id for offer in await self.service.open_offers_of(session, driver_id)]
        open_seen = [booking_id for booking_id in open_ids if booking_id in seen]
        quoted = [booking_id for booking_id, wamid in seen.items() if wamid == message.context_message_id]
        recently_expired = [booking_id for booking_id in seen if booking_id not in open_ids]
        if message.context_message_id and len(quoted) == 1:
            target = quoted[0]
        elif len(open_seen) == 1 and not recently_expired:
            target = open_seen[0]
        elif not open_seen and len(recently_expired) == 1:
            target = recently_expired[0]  # a late answer: recorded, and told OFFER_EXPIRED as a late tap
        else:
            body = messages.no_open_offer() if not open_seen else messages.several_open_offers(len(seen))
            await outbox.enqueue(session, [_reply(message, Category.DRIVER_REPLY, body, now)])
            return "NO_OPEN_OFFER" if not open_seen else "AMBIGUOUS"
        try:
            result = await self.service.respond_in(session, target, driver_id, answer)
        except DispatchdError as exc:
            return exc.code
        return result.action.value


async def _seen_offer_messages(session: AsyncSession, phone: str, since) -> dict[str, str | None]:
    """``{booking id: wamid}`` of the offers whose message reached this phone and whose offer was open
    at or after ``since`` (UTC)."""
    rows = await session.execute(
        select(BookingOffer.booking_id, Notification.provider_message_id)
        .join(Driver, Driver.id == BookingOffer.driver_id)
        .join(
            Notification,
            (Notification.subject == literal("booking:") + BookingOffer.booking_id)
            & (Notification.recipient == Driver.phone)
            & (Notification.category == Category.DRIVER_OFFER.value),
        )
        .where(
            Driver.phone == phone,
            BookingOffer.expires_at >= since,
            BookingOffer.response.is_(None) | (BookingOffer.response == OfferResponse.TIMEOUT.value),
            Notification.status.in_(outbox.HANDED_STATUSES),
        )
    )
    return {booking_id: wamid for booking_id, wamid in rows.all()}


class CustomerAnswer:
    """``matching.customer_answer``: ``RELAUNCHED`` (with the new booking's search started), ``LATER`` or
    ``CANCELLED``, recorded once on the timed-out booking (``customer_answer``) with an event."""

    name = "matching.customer_answer"

    def __init__(self, service: MatchingService) -> None:
        self.service = service

    async def route(self, session: AsyncSession, message: Inbound) -> str | None:
        if message.button_id is not None:
            return None
        choice = CUSTOMER_CHOICES.get(normalise(message.text))
        if choice is None:
            return None
        now = session.info["now"]
        booking = await session.scalar(
            lock_for_update(
                select(Booking)
                .where(Booking.customer_phone == message.from_phone)
                .order_by(Booking.created_at.desc(), Booking.id.desc())
                .limit(1)
                .execution_options(populate_existing=True)
            )
        )
        if (
            booking is None
            or booking.status != BookingStatus.TIMEOUT.value
            or booking.customer_answer is not None
            or now - booking.updated_at > CUSTOMER_ANSWER_WINDOW
        ):
            return None
        booking.customer_answer = choice
        data: dict[str, str] = {"answer": choice}
        if choice == "RELAUNCHED":
            relaunched = await self.service.relaunch_in(session, booking.id)
            data["new_booking_id"] = relaunched.booking.id
        else:
            body = messages.search_later() if choice == "LATER" else messages.request_dropped()
            await outbox.enqueue(session, [_reply(message, Category.CUSTOMER_REPLY, body, now)])
        events.append(session, topics.booking(booking.id), "CustomerAnswered", data)
        return choice


def handlers(service: MatchingService) -> tuple[OfferButton, TypedAnswer, CustomerAnswer]:
    """Matching's inbound handlers, in the order they are offered a message."""
    return OfferButton(service), TypedAnswer(service), CustomerAnswer(service)
