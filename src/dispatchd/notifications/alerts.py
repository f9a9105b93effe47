"""Admin alerts on delivery health (seed 004 §5 "Système d'Alertes Admin", issue 3).

Rules, evaluated every ``interval_s`` (60 s):

- ``FAILURES_1H``: ≥ 20 failed attempts in the last hour (critical);
- ``PERMANENT_24H``: ≥ 5 messages FAILED_PERMANENT in the last 24 h (warning);
- ``FAILURE_RATE_1H``: failed / (failed + sent) ≥ 50 % over the last hour, with at least 10 outcomes;
- ``ACCOUNT_PROBLEM``: a provider error of class ALERT (token, permissions, account) in the last hour;
- ``CIRCUIT_OPEN:<channel>``: a channel's circuit breaker is open;
- ``SLOW_DELIVERY``: a customer or admin message (priority ≤ NORMAL) has waited longer than
  ``latency_alert_s`` (``DISPATCHD_NOTIFICATION_LATENCY_ALERT_S``, 60 s) without being sent (issue 7).

Each rule fires at most once per ``cooldown_s`` (1 h); the last firing time is a row of ``alert_state``,
taken with a conditional write, so restarts and several instances do not repeat an alert. An alert is
an ``admin_alert`` message through the outbox to every ``DISPATCHD_ADMIN_PHONES`` (WhatsApp) and
``DISPATCHD_ADMIN_EMAILS`` (email) — or to ``admin`` (the log) when none is configured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database
from dispatchd.core.logging import get_logger
from dispatchd.notifications import outbox
from dispatchd.notifications.breaker import CircuitBreaker, CircuitState
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.models import OPEN_STATUSES, AlertState, Notification, NotificationStatus
from dispatchd.notifications.outbox import Combined, Message
from dispatchd.notifications.policy import ADMIN_ALERT, Priority

log = get_logger("dispatchd.notifications.alerts")


FAILED = (NotificationStatus.FAILED.value, NotificationStatus.FAILED_PERMANENT.value)

#: Alerts one digest carries at most, and how much of each it quotes, so that it stays under WhatsApp's
#: 4,096 characters; the rest wait for the admin's next slot.
ALERTS_PER_DIGEST_MAX = 10
ALERT_EXCERPT_MAX = 380
DIGEST_MAX = 4096


@dataclass(frozen=True)
class Thresholds:
    failures_per_hour: int = 20
    permanent_per_day: int = 5
    failure_rate: float = 0.5
    min_outcomes: int = 10
    cooldown_s: float = 3600.0
    latency_alert_s: float = 60.0


@dataclass(frozen=True)
class Alert:
    rule: str
    severity: str
    text: str


class AlertMonitor:
    def __init__(
        self,
        db: Database,
        breakers: list[CircuitBreaker],
        *,
        admin_phones: tuple[str, ...] = (),
        admin_emails: tuple[str, ...] = (),
        thresholds: Thresholds | None = None,
        interval_s: float = 60.0,
    ) -> None:
        self.db = db
        self.breakers = breakers
        self.recipients = (*admin_phones, *admin_emails) or ("admin",)
        self.thresholds = thresholds or Thresholds()
        self.interval_s = interval_s

    async def evaluate(self, session: AsyncSession, now: datetime) -> list[Alert]:
        """The rules that hold now (cooldown not considered)."""
        t = self.thresholds
        hour_ago, day_ago = now - timedelta(hours=1), now - timedelta(hours=24)
        failed_1h = await session.scalar(
            select(func.count()).where(Notification.failed_at >= hour_ago, Notification.status.in_(FAILED))
        )
        permanent_24h = await session.scalar(
            select(func.count()).where(
                Notification.failed_at >= day_ago,
                Notification.status == NotificationStatus.FAILED_PERMANENT.value,
            )
        )
        sent_1h = await session.scalar(select(func.count()).where(Notification.sent_at >= hour_ago))
        account = await session.scalar(
            select(Notification.error_code)
            .where(Notification.failed_at >= hour_ago, Notification.error_kind == "ALERT")
            .order_by(Notification.failed_at.desc())
            .limit(1)
        )
        slow, slowest = (
            await session.execute(
                select(func.count(), func.min(Notification.created_at)).where(
                    Notification.status.in_([s.value for s in OPEN_STATUSES]),
                    Notification.priority <= Priority.NORMAL,
                    Notification.created_at <= now - timedelta(seconds=t.latency_alert_s),
                )
            )
        ).one()
        alerts: list[Alert] = []
        if slow:
            alerts.append(
                Alert(
                    "SLOW_DELIVERY",
                    "CRITIQUE",
                    f"{slow} message(s) clients/admins non envoyés depuis plus de {t.latency_alert_s:g} s "
                    f"(le plus ancien attend depuis {(now - slowest).total_seconds():.0f} s)",
                )
            )
        if failed_1h >= t.failures_per_hour:
            alerts.append(
                Alert("FAILURES_1H", "CRITIQUE", f"{failed_1h} échecs d'envoi dans la dernière heure")
            )
        if permanent_24h >= t.permanent_per_day:
            alerts.append(
                Alert(
                    "PERMANENT_24H", "ATTENTION", f"{permanent_24h} échecs définitifs sur les dernières 24 h"
                )
            )
        outcomes = failed_1h + sent_1h
        if outcomes >= t.min_outcomes and failed_1h / outcomes >= t.failure_rate:
            alerts.append(
                Alert(
                    "FAILURE_RATE_1H",
                    "CRITIQUE",
                    f"taux d'échec {failed_1h / outcomes:.0%} sur {outcomes} envois",
                )
            )
        if account:
            alerts.append(
                Alert("ACCOUNT_PROBLEM", "CRITIQUE", f"le fournisseur refuse le compte ({account})")
            )
        for breaker in self.breakers:
            if breaker.state is not CircuitState.CLOSED:
                alerts.append(
                    Alert(
                        f"CIRCUIT_OPEN:{breaker.channel}",
                        "CRITIQUE",
                        f"canal {breaker.channel} suspendu: {breaker.reason}. "
                        "Les messages attendent, aucun n'est perdu.",
                    )
                )
        return alerts

    async def run_once(self) -> list[Alert]:
        """Evaluate the rules and send the alerts whose cooldown has passed; return those sent."""
        async with self.db.transaction() as session:
            now = session.info["now"]
            fired = [
                alert for alert in await self.evaluate(session, now) if await self._claim(session, alert, now)
            ]
            if fired:
                await outbox.enqueue(
                    session,
                    [
                        Message(recipient=recipient, category=ADMIN_ALERT, body=_text(alert, now))
                        for alert in fired
                        for recipient in self.recipients
                    ],
                )
        for alert in fired:
            log.warning("admin alert", rule=alert.rule, detail=alert.text)
        return fired

    async def _claim(self, session: AsyncSession, alert: Alert, now: datetime) -> bool:
        """Take the rule's cooldown slot: one conditional write, so only one instance fires."""
        cutoff = now - timedelta(seconds=self.thresholds.cooldown_s)
        taken = await session.execute(
            update(AlertState)
            .where(AlertState.rule == alert.rule, AlertState.last_fired_at <= cutoff)
            .values(last_fired_at=now, detail=alert.text)
        )
        if taken.rowcount == 1:
            return True
        if await session.get(AlertState, alert.rule) is not None:
            return False  # still cooling down
        try:
            async with session.begin_nested():
                session.add(AlertState(rule=alert.rule, last_fired_at=now, detail=alert.text))
        except IntegrityError:
            return False  # another instance fired it a moment ago
        return True

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("alert evaluation failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass


def _text(alert: Alert, now: datetime) -> str:
    return (
        f"🚨 *ALERTE ADMIN — {alert.severity}*\n\n"
        f"Notifications: {alert.text}.\n\n"
        "🔍 **Actions suggérées:**\n"
        "- `dispatchd notifications health` pour l'état des canaux\n"
        "- `dispatchd notifications list --status FAILED_PERMANENT` pour les détails\n"
        "- après correction: `dispatchd notifications retry`\n\n"
        f"Règle: {alert.rule} · {now.strftime('%d/%m/%Y %H:%M UTC')}"
    )


def combine_alerts(alerts: Sequence[OutboundMessage]) -> Combined:
    """One digest for an admin's queued alerts, oldest first: a burst of search timeouts at a peak reaches
    the admin in one message instead of one per 6 s (Meta's pair limit)."""
    chosen = list(alerts)[:ALERTS_PER_DIGEST_MAX]
    excerpts = [
        alert.body if len(alert.body) <= ALERT_EXCERPT_MAX else alert.body[: ALERT_EXCERPT_MAX - 1] + "…"
        for alert in chosen
    ]
    body = f"🚨 *{len(chosen)} ALERTES ADMIN*\n\n" + "\n\n———\n\n".join(excerpts)
    return Combined(tuple(alert.id for alert in chosen), body[:DIGEST_MAX], {})
