"""The ``log`` channel (embedded default): writes each message to the log (recipient masked, as every
phone number in a log line) and reports it sent."""

from __future__ import annotations

from dispatchd.core.logging import get_logger
from dispatchd.core.phone import mask_phones
from dispatchd.notifications.channels.base import OutboundMessage, SendResult

log = get_logger("dispatchd.notifications.log")


class LogChannel:
    name = "log"

    async def send(self, message: OutboundMessage) -> SendResult:
        log.info(
            "notification",
            notification_id=message.id,
            recipient=mask_phones(message.recipient),
            category=message.category,
            body=message.body,
        )
        return SendResult(provider_message_id=f"log-{message.id}")
