"""Build the delivery lanes from the settings (``DISPATCHD_NOTIFICATION_CHANNEL`` and credentials).

Routing by recipient: an email address goes to SMTP (when ``DISPATCHD_SMTP_URL`` is set); an E.164
phone to the configured phone channel (``log``, ``whatsapp_cloud`` or ``wachap``); anything else (the
``admin`` placeholder when no admin phone is configured) to the ``log`` channel.
"""

from __future__ import annotations

from sqlalchemy import and_, not_

from dispatchd.config import Settings
from dispatchd.core.clock import Clock
from dispatchd.notifications.breaker import CircuitBreaker
from dispatchd.notifications.channels.base import Channel
from dispatchd.notifications.channels.log import LogChannel
from dispatchd.notifications.delivery import Lane
from dispatchd.notifications.models import Notification


def phone_channel(settings: Settings) -> Channel:
    """The channel for phone recipients; secrets are unwrapped here and nowhere else."""
    if settings.notification_channel == "whatsapp_cloud":
        from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel

        return WhatsAppCloudChannel(
            settings.whatsapp_api_base_url,
            settings.whatsapp_phone_number_id or "",
            settings.whatsapp_access_token.get_secret_value() if settings.whatsapp_access_token else "",
        )
    if settings.notification_channel == "wachap":
        from dispatchd.notifications.channels.wachap import WaChapChannel

        return WaChapChannel(
            settings.wachap_api_url or "",
            settings.wachap_access_token.get_secret_value() if settings.wachap_access_token else "",
            settings.wachap_instance_id or "",
        )
    return LogChannel()


def build_lanes(settings: Settings, clock: Clock) -> list[Lane]:
    email = Notification.recipient.like("%@%")
    phone = Notification.recipient.like("+%")
    lanes: list[Lane] = []
    channel = phone_channel(settings)
    rate = None if channel.name == "log" else settings.channel_rate or None
    if settings.smtp_url is not None:
        from dispatchd.notifications.channels.smtp import SmtpChannel

        smtp = SmtpChannel(settings.smtp_url.get_secret_value(), settings.smtp_sender)
        lanes.append(Lane(smtp, email, CircuitBreaker(smtp.name, clock), rate=None))
        others = not_(email)
    else:
        others = None
    if channel.name == "log":
        lanes.append(
            Lane(
                channel,
                others if others is not None else phone | not_(phone),
                CircuitBreaker("log", clock),
                None,
            )
        )
    else:
        lanes.append(Lane(channel, phone, CircuitBreaker(channel.name, clock), rate))
        fallback = and_(not_(phone), others) if others is not None else not_(phone)
        lanes.append(Lane(LogChannel(), fallback, CircuitBreaker("log", clock), None))
    return lanes
