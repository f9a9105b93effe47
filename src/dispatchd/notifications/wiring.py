"""The notifications domain as the app assembles it (:func:`build`), and its delivery lanes built from
the settings (``DISPATCHD_NOTIFICATION_CHANNEL`` and credentials).

Routing by recipient: an email address goes to SMTP (when ``DISPATCHD_SMTP_URL`` is set); an E.164
phone to the configured phone channel (``log``, ``whatsapp_cloud`` or ``wachap``); anything else (the
``admin`` placeholder when no admin phone is configured) to the ``log`` channel.
"""

from __future__ import annotations

from sqlalchemy import and_, not_

from dispatchd.config import Settings
from dispatchd.core.clock import Clock
from dispatchd.core.health import grade
from dispatchd.core.sweeper import CLEANUP, Deadline
from dispatchd.core.wiring import Context, Domain, HealthContribution
from dispatchd.notifications import admin, inbox_router, router, webhooks
from dispatchd.notifications.alerts import ADMIN_ALERT, AlertMonitor, Thresholds, combine_alerts
from dispatchd.notifications.breaker import CircuitBreaker
from dispatchd.notifications.channels.base import Channel
from dispatchd.notifications.channels.log import LogChannel
from dispatchd.notifications.delivery import DeliveryWorker, Lane
from dispatchd.notifications.expiry import OutboxExpiry
from dispatchd.notifications.inbox import Inbox
from dispatchd.notifications.models import Notification


def phone_channel(settings: Settings) -> Channel:
    """The channel for phone recipients; secrets are unwrapped here and nowhere else."""
    if settings.notification_channel == "whatsapp_cloud":
        from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel

        return WhatsAppCloudChannel(
            settings.whatsapp_api_base_url,
            settings.whatsapp_phone_number_id or "",
            settings.whatsapp_access_token.get_secret_value() if settings.whatsapp_access_token else "",
            http2=settings.whatsapp_http2,
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


def build(context: Context) -> Domain:
    """The notifications domain: the outbox's delivery worker, its expiry deadline, the admin alert
    monitor, the inbound inbox (routing deadline, routes), its health component and its gauges."""
    settings, db = context.settings, context.db
    delivery = DeliveryWorker(
        db,
        lanes=build_lanes(settings, db.clock),
        batch_size=settings.delivery_batch_size,
        concurrency=settings.delivery_concurrency,
        loops=4,
        lease_s=settings.delivery_lease_s,
        recipient_interval_s=settings.recipient_interval_s,
        templates=settings.whatsapp_templates,
        coalescers=context.coalescers,
    )
    alerts = AlertMonitor(
        db,
        delivery.breakers,
        admin_phones=tuple(settings.admin_phones),
        admin_emails=tuple(settings.admin_emails),
        thresholds=Thresholds.from_settings(settings),
        interval_s=settings.alert_interval_s,
        rules=context.alert_rules,  # every domain's, filled by the assembly once all are built
        sweeper=context.sweeper,
        email_enabled=settings.alert_email_enabled,
        whatsapp_enabled=settings.alert_whatsapp_enabled,
    )
    inbox = Inbox(context.inbound_handlers)
    expiry = OutboxExpiry()

    async def health() -> HealthContribution:
        outbox = await admin.backlog(db)
        now = db.clock.now()
        oldest_age = (now - outbox.oldest).total_seconds() if outbox.oldest else None
        # Graded on what must reach people in seconds (customers, admins): driver offers expire by design.
        must = outbox.oldest_must_deliver
        must_age = (now - must).total_seconds() if must else None
        bound = settings.notification_latency_alert_s
        component = {
            "status": grade(must_age, bound, 5 * bound),
            "channel": delivery.channel.name,
            "backlog": outbox.open,
            "oldest_waiting_s": None if oldest_age is None else round(oldest_age, 3),
            "oldest_customer_or_admin_due_s": None if must_age is None else round(must_age, 3),
            "held_by_pacing": outbox.held_by_pacing,
        }
        return component, {}

    async def refresh_metrics() -> None:
        await admin.backlog(db)  # sets the outbox gauges

    return Domain(
        name="notifications",
        routers=(router.router, inbox_router.router, webhooks.router),
        openapi_tags=(
            {"name": "notifications", "description": "The outbox of outgoing messages (seed 004)"},
            {"name": "inbound", "description": "Inbound WhatsApp messages and where each was routed"},
            {"name": "webhooks", "description": "WhatsApp Cloud API webhooks (signed by Meta)"},
        ),
        deadlines=(
            Deadline("notification_expiry", expiry.expire_due, expiry.oldest_due, phase=CLEANUP),
            inbox.deadline(),
        ),
        coalescers={ADMIN_ALERT: combine_alerts},
        health=health,
        refresh_metrics=refresh_metrics,
        background={"delivery": delivery.run_forever}
        | ({"alerts": alerts.run_forever} if settings.alerts_enabled else {}),
        on_commit=(),
        extras={"delivery": delivery, "alerts": alerts, "inbox": inbox},
    )
