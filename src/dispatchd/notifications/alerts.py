"""Admin alerts: the 60 s monitor (seed 004 §5 "Système d'Alertes Admin"; seed 000 ``AdminAlertService``
and "Health checks: vérification système toutes les minutes"; issues 3 and 14).

Rules of this module, evaluated every ``interval_s`` (``DISPATCHD_ALERT_INTERVAL_S``, 60 s), with their
default severity:

- ``FAILURES_1H`` (critical): ≥ ``failures_per_hour`` (20) failed send *attempts* in the last hour;
- ``PERMANENT_24H`` (warning): ≥ ``permanent_per_day`` (5) permanent failures in the last 24 h;
- ``FAILURE_RATE_1H`` (critical): failed attempts / (failed attempts + messages sent) ≥ ``failure_rate``
  (50 %) over the last hour, with at least ``min_outcomes`` (10) of them;
- ``ACCOUNT_PROBLEM`` (critical): a provider error of class ALERT (token, permissions, account) in the hour;
- ``CIRCUIT_OPEN:<channel>`` (critical): a channel's circuit breaker is open;
- ``SLOW_DELIVERY`` (critical): a customer or admin message (priority ≤ NORMAL) has waited longer than
  ``latency_alert_s`` (``DISPATCHD_NOTIFICATION_LATENCY_ALERT_S``, 60 s) without being sent (issue 7);
- ``SWEEPER_STALLED`` (critical): the sweeper's last complete tick is older than ``sweeper_stalled_s``
  (``DISPATCHD_SWEEPER_LAG_CRITICAL_S``, 30 s) — seed 000 ``alertSystemError``;
- ``DEADLINE_FAILED`` (critical): a deadline handler raised within the last ``interval_s``;
- ``DATABASE_UNREACHABLE`` (critical): the monitor's own evaluation could not reach the database; sent
  once it answers again ("entre T1 et T2"), since the alerts go through the database-backed outbox.

Other domains add rules through ``Domain.alert_rules`` (matching: ``LOW_DRIVER_AVAILABILITY``,
``SEARCH_TIMEOUT_RATE``), each an ``async (session, now) -> list[Alert]``; this module imports no domain.

**Failed attempts are counted from the event log**: the delivery worker appends one
``NotificationFailed`` / ``NotificationFailedPermanently`` event on the ``notifications`` topic per failed
attempt (not for a send held back by pacing nor a channel that is down: those burn no attempt), so a
message that failed three times in the hour counts three, and one that failed then succeeded still counts.
Rows' ``failed_at`` would only count the messages whose *last* failure is recent. The query reads the
topic through ``ix_events_topic_id`` and filters on ``created_at``.

Each rule fires at most once per ``cooldown_s`` (``DISPATCHD_ALERT_COOLDOWN_S``, 1 h); the last firing
time is a row of ``alert_state``, taken with a conditional write, so restarts and several instances do not
repeat an alert. An alert is an ``admin_alert`` message through the outbox: critical ones to every
``DISPATCHD_ADMIN_PHONES`` (WhatsApp, unless ``DISPATCHD_ALERT_WHATSAPP_ENABLED=false``) and
``DISPATCHD_ADMIN_EMAILS``; warnings to the emails only (``DISPATCHD_ALERT_EMAIL_ENABLED``); to ``admin``
(the log channel) when that leaves nobody. ``DISPATCHD_ALERT_SEVERITIES`` changes a rule's severity or
turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import topics
from dispatchd.core.db import Database
from dispatchd.core.events import Event
from dispatchd.core.logging import get_logger
from dispatchd.notifications import outbox
from dispatchd.notifications.breaker import CircuitBreaker, CircuitState
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.models import OPEN_STATUSES, AlertState, Notification, NotificationStatus
from dispatchd.notifications.outbox import Combined, Message
from dispatchd.notifications.policy import ADMIN_ALERT, Priority

if TYPE_CHECKING:
    from dispatchd.config import Settings
    from dispatchd.core.sweeper import Sweeper
    from dispatchd.core.wiring import AlertRule

log = get_logger("dispatchd.notifications.alerts")


FAILED = (NotificationStatus.FAILED.value, NotificationStatus.FAILED_PERMANENT.value)
#: the ``notifications`` topic's events that record one failed send attempt (delivery.py)
FAILED_ATTEMPT_EVENTS = ("NotificationFailed", "NotificationFailedPermanently")
PERMANENT_FAILURE_EVENT = "NotificationFailedPermanently"
SENT_STATUSES = (
    NotificationStatus.SENT.value,
    NotificationStatus.DELIVERED.value,
    NotificationStatus.READ.value,
)

#: Alerts one digest carries at most, and how much of each it quotes, so that it stays under WhatsApp's
#: 4,096 characters; the rest wait for the admin's next slot.
ALERTS_PER_DIGEST_MAX = 10
ALERT_EXCERPT_MAX = 380
DIGEST_MAX = 4096


class Severity(StrEnum):
    """critical: WhatsApp and email; warning: email only (seed 004 §5 "Canaux d'alerte")."""

    CRITICAL = "critical"
    WARNING = "warning"


#: how an alert names its severity to the admins (the seed's wording)
SEVERITY_LABELS = {Severity.CRITICAL: "CRITIQUE", Severity.WARNING: "ATTENTION"}

NOTIFICATION_ACTIONS = (
    "`dispatchd notifications health` pour l'état des canaux",
    "`dispatchd notifications list --status FAILED_PERMANENT` pour les détails",
    "après correction: `dispatchd notifications retry --now`",
)
SYSTEM_ACTIONS = (
    "`GET /ready` et `GET /v1/health` (base de données, sweeper)",
    "les journaux: `sweeper tick failed`, `deadline handler failed`",
)


@dataclass(frozen=True)
class Thresholds:
    """The rules' thresholds (counts; rates in [0, 1]; durations in seconds) and per-rule severities
    (rule → ``critical`` | ``warning`` | ``off``; ``DISPATCHD_ALERT_SEVERITIES``)."""

    failures_per_hour: int = 20
    permanent_per_day: int = 5
    failure_rate: float = 0.5
    min_outcomes: int = 10
    cooldown_s: float = 3600.0
    latency_alert_s: float = 60.0
    sweeper_stalled_s: float = 30.0
    severities: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        """From the ``DISPATCHD_ALERT_*`` settings (seed 004 §5 "Seuils d'alerte")."""
        return cls(
            failures_per_hour=settings.alert_failures_per_hour,
            permanent_per_day=settings.alert_permanent_per_day,
            failure_rate=settings.alert_failure_rate,
            min_outcomes=settings.alert_min_outcomes,
            cooldown_s=settings.alert_cooldown_s,
            latency_alert_s=settings.notification_latency_alert_s,
            sweeper_stalled_s=settings.sweeper_lag_critical_s,
            severities=dict(settings.alert_severities),
        )

    def severity_of(self, alert: Alert) -> Severity | None:
        """The configured severity of ``alert``'s rule (exact name first, then the part before ``:``), its
        own when not configured, or None when the rule is ``off``."""
        level = self.severities.get(alert.rule) or self.severities.get(alert.rule.partition(":")[0])
        if level is None:
            return alert.severity
        return None if level == "off" else Severity(level)


@dataclass(frozen=True)
class Alert:
    """One rule that holds: its ``rule`` name (the cooldown key), default ``severity``, a French ``text``
    for the admins (no customer phone), the ``area`` it is about and the suggested ``actions``."""

    rule: str
    severity: Severity
    text: str
    area: str = "Notifications"
    actions: tuple[str, ...] = NOTIFICATION_ACTIONS


@dataclass(frozen=True)
class Check:
    """One evaluation: the alerts that hold now, and those of them sent (their cooldown had passed)."""

    holding: list[Alert]
    sent: list[Alert]


async def failed_attempts(session: AsyncSession, since: datetime, *, permanent_only: bool = False) -> int:
    """Failed send attempts since ``since`` (UTC), from the ``notifications`` topic's events."""
    kinds = (PERMANENT_FAILURE_EVENT,) if permanent_only else FAILED_ATTEMPT_EVENTS
    return int(
        await session.scalar(
            select(func.count()).where(
                Event.topic == topics.NOTIFICATIONS, Event.type.in_(kinds), Event.created_at >= since
            )
        )
        or 0
    )


async def failed_attempts_by_class(session: AsyncSession, since: datetime) -> dict[str, int]:
    """Failed send attempts since ``since`` (UTC) by error class (``TEMPORARY``, ``PERMANENT``, ``ALERT``,
    ``WINDOW_CLOSED``, ``UNKNOWN``; ``null`` for an expiry), most frequent first, from the event log."""
    kind = Event.data["error_kind"].as_string()
    rows = (
        await session.execute(
            select(kind, func.count())
            .where(
                Event.topic == topics.NOTIFICATIONS,
                Event.type.in_(FAILED_ATTEMPT_EVENTS),
                Event.created_at >= since,
            )
            .group_by(kind)
            .order_by(func.count().desc())
        )
    ).all()
    return {str(name) if name is not None else "null": int(count) for name, count in rows}


async def sent_since(session: AsyncSession, since: datetime) -> int:
    """Messages sent (accepted by the provider) since ``since`` (UTC), from the rows' ``sent_at``."""
    return int(await session.scalar(select(func.count()).where(Notification.sent_at >= since)) or 0)


class AlertMonitor:
    """Evaluates every rule each ``interval_s`` and writes the alerts whose cooldown has passed to the
    outbox. ``rules`` are the other domains' rules (the assembly fills the list after building them);
    ``sweeper`` is None where no sweeper runs (the CLI), which leaves out the sweeper's rules."""

    def __init__(
        self,
        db: Database,
        breakers: list[CircuitBreaker],
        *,
        admin_phones: tuple[str, ...] = (),
        admin_emails: tuple[str, ...] = (),
        thresholds: Thresholds | None = None,
        interval_s: float = 60.0,
        rules: Sequence[AlertRule] = (),
        sweeper: Sweeper | None = None,
        email_enabled: bool = True,
        whatsapp_enabled: bool = True,
    ) -> None:
        self.db = db
        self.breakers = breakers
        self.admin_phones = admin_phones if whatsapp_enabled else ()
        self.admin_emails = admin_emails if email_enabled else ()
        self.thresholds = thresholds or Thresholds()
        self.interval_s = interval_s
        self.rules = rules
        self.sweeper = sweeper
        self.started_at = db.clock.now()
        #: the first and last failed evaluation of a database outage not yet reported, and how many failed
        self.outage: tuple[datetime, datetime, int] | None = None

    def recipients(self, severity: Severity) -> tuple[str, ...]:
        """Critical: the admin phones (WhatsApp) and emails; warning: the emails; ``admin`` (the log
        channel) when that leaves nobody."""
        phones = self.admin_phones if severity is Severity.CRITICAL else ()
        return (*phones, *self.admin_emails) or ("admin",)

    async def evaluate(self, session: AsyncSession, now: datetime) -> list[Alert]:
        """The rules that hold now (cooldown not considered), with their configured severities; rules
        turned ``off`` left out. A domain's rule that raises is logged and skipped (its savepoint rolled
        back), so one broken rule never silences the others."""
        alerts = [
            *await self._notification_rules(session, now),
            *self._system_rules(now),
        ]
        for rule in self.rules:
            try:
                async with session.begin_nested():
                    alerts.extend(await rule(session, now))
            except Exception:
                log.exception("alert rule failed", rule=getattr(rule, "__qualname__", repr(rule)))
        configured = []
        for alert in alerts:
            severity = self.thresholds.severity_of(alert)
            if severity is not None:
                configured.append(replace(alert, severity=severity))
        return configured

    async def _notification_rules(self, session: AsyncSession, now: datetime) -> list[Alert]:
        t = self.thresholds
        hour_ago, day_ago = now - timedelta(hours=1), now - timedelta(hours=24)
        failed_1h = await failed_attempts(session, hour_ago)
        permanent_24h = await failed_attempts(session, day_ago, permanent_only=True)
        sent_1h = await sent_since(session, hour_ago)
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
                    Severity.CRITICAL,
                    f"{slow} message(s) clients/admins non envoyés depuis plus de {t.latency_alert_s:g} s "
                    f"(le plus ancien attend depuis {(now - slowest).total_seconds():.0f} s)",
                )
            )
        if failed_1h >= t.failures_per_hour:
            alerts.append(
                Alert("FAILURES_1H", Severity.CRITICAL, f"{failed_1h} échecs d'envoi dans la dernière heure")
            )
        if permanent_24h >= t.permanent_per_day:
            alerts.append(
                Alert(
                    "PERMANENT_24H",
                    Severity.WARNING,
                    f"{permanent_24h} échecs définitifs sur les dernières 24 h",
                )
            )
        outcomes = failed_1h + sent_1h
        if outcomes >= t.min_outcomes and failed_1h / outcomes >= t.failure_rate:
            alerts.append(
                Alert(
                    "FAILURE_RATE_1H",
                    Severity.CRITICAL,
                    f"taux d'échec {failed_1h / outcomes:.0%} sur {outcomes} envois",
                )
            )
        if account:
            alerts.append(
                Alert("ACCOUNT_PROBLEM", Severity.CRITICAL, f"le fournisseur refuse le compte ({account})")
            )
        for breaker in self.breakers:
            if breaker.state is not CircuitState.CLOSED:
                alerts.append(
                    Alert(
                        f"CIRCUIT_OPEN:{breaker.channel}",
                        Severity.CRITICAL,
                        f"canal {breaker.channel} suspendu: {breaker.reason}. "
                        "Les messages attendent, aucun n'est perdu.",
                    )
                )
        return alerts

    def _system_rules(self, now: datetime) -> list[Alert]:
        """Seed 000 ``alertSystemError``: the sweeper stalled, a deadline handler failed, the database
        was unreachable (reported once it answers again)."""
        alerts: list[Alert] = []
        if self.outage is not None:
            first, last, failures = self.outage
            alerts.append(
                Alert(
                    "DATABASE_UNREACHABLE",
                    Severity.CRITICAL,
                    f"base de données injoignable entre {_hhmm(first)} et {_hhmm(last)} "
                    f"({failures} évaluation(s) des alertes en échec)",
                    area="Système",
                    actions=SYSTEM_ACTIONS,
                )
            )
        sweeper = self.sweeper
        if sweeper is None:
            return alerts
        since = sweeper.last_tick_at or self.started_at
        silent_s = (now - since).total_seconds()
        if silent_s > self.thresholds.sweeper_stalled_s:
            alerts.append(
                Alert(
                    "SWEEPER_STALLED",
                    Severity.CRITICAL,
                    f"le sweeper des échéances n'a pas terminé de tour depuis {silent_s:.0f} s "
                    "(offres, recherches et messages expirés ne sont plus traités)",
                    area="Système",
                    actions=SYSTEM_ACTIONS,
                )
            )
        failed_at = sweeper.last_failure_at
        if failed_at is not None and failed_at > now - timedelta(seconds=self.interval_s):
            deadline, error = sweeper.last_failure or ("?", "?")
            alerts.append(
                Alert(
                    "DEADLINE_FAILED",
                    Severity.CRITICAL,
                    f"l'échéance {deadline} a échoué ({error}) à {_hhmm(failed_at)}; "
                    f"{sweeper.failures_total} échec(s) depuis le démarrage",
                    area="Système",
                    actions=SYSTEM_ACTIONS,
                )
            )
        return alerts

    async def check(self) -> Check:
        """Evaluate every rule and send the alerts whose cooldown has passed, in one transaction.

        Returns the :class:`Check`. Raises the database's error when it cannot be reached (the caller
        decides: :meth:`run_once` records the outage, the CLI's ``health --check`` exits non-zero)."""
        async with self.db.transaction() as session:
            now = session.info["now"]
            holding = await self.evaluate(session, now)
            fired = [alert for alert in holding if await self._claim(session, alert, now)]
            if fired:
                await outbox.enqueue(
                    session,
                    [
                        Message(recipient=recipient, category=ADMIN_ALERT, body=_text(alert, now))
                        for alert in fired
                        for recipient in self.recipients(alert.severity)
                    ],
                )
        self.outage = None  # reported (or cooling down) now that the database answers
        for alert in fired:
            log.warning("admin alert", rule=alert.rule, severity=alert.severity.value, detail=alert.text)
        return Check(holding, fired)

    async def run_once(self) -> list[Alert]:
        """Evaluate the rules and send the alerts whose cooldown has passed; return those sent.

        A database that does not answer cannot carry an alert (the outbox is in it): the failure is logged
        at critical level, counted, and reported as ``DATABASE_UNREACHABLE`` once it answers again."""
        try:
            return (await self.check()).sent
        except (DBAPIError, OSError) as exc:
            now = self.db.clock.now()
            first, _, failures = self.outage or (now, now, 0)
            self.outage = (first, now, failures + 1)
            log.critical("database unreachable: admin alerts wait for it", error=type(exc).__name__)
            return []

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


def _hhmm(at: datetime) -> str:
    return at.strftime("%d/%m/%Y %H:%M:%S UTC")


def _text(alert: Alert, now: datetime) -> str:
    icon = "🚨" if alert.severity is Severity.CRITICAL else "⚠️"
    actions = "".join(f"- {action}\n" for action in alert.actions)
    return (
        f"{icon} *ALERTE ADMIN — {SEVERITY_LABELS[alert.severity]}*\n\n"
        f"{alert.area}: {alert.text}.\n\n"
        "🔍 **Actions suggérées:**\n"
        f"{actions}\n"
        f"Règle: {alert.rule} · {now.strftime('%d/%m/%Y %H:%M UTC')}"
    )


def describe(alert: Alert) -> dict[str, Any]:
    """``{"rule", "severity", "area", "text"}``: an alert as the CLI and the API show it."""
    return {"rule": alert.rule, "severity": alert.severity.value, "area": alert.area, "text": alert.text}


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
