"""Provider delivery statuses (``sent`` → ``delivered`` → ``read``, or ``failed``) applied to the outbox.

Source: Meta Cloud API "Webhooks", the ``statuses`` object; error codes from Meta's "Error codes" page
(``131047``: the 24 h customer service window is closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import lock_for_update
from dispatchd.notifications.models import Notification, NotificationStatus
from dispatchd.notifications.webhook_parsing import StatusUpdate

#: Delivery progress; a status is applied only when its rank is not below the current one.
RANK = {NotificationStatus.SENT: 1, NotificationStatus.DELIVERED: 2, NotificationStatus.READ: 3}
#: Meta status → ours, for the ranked ones (``failed`` is handled apart; others are ignored).
RANKED_STATUSES = {
    "sent": NotificationStatus.SENT,
    "delivered": NotificationStatus.DELIVERED,
    "read": NotificationStatus.READ,
}


def apply_status(
    notification: Notification,
    update_: StatusUpdate,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> bool:
    """Move ``notification`` forward with one provider status; True when anything changed.

    ``sent`` < ``delivered`` < ``read``: a status ranked below the current one changes nothing (Meta does
    not guarantee order). ``failed`` → FAILED_PERMANENT with ``error_code`` ``META_<code>``, unless the
    message was already DELIVERED or READ — except ``META_131047`` (the 24 h window closed) when
    ``templates`` has the message's category: then it goes back to PENDING to be re-sent as that approved
    template, as a synchronous 131047 would. Rows not in SENT / DELIVERED / READ (failed, cancelled…) are
    left alone; ``played`` and other statuses are ignored.
    """
    current = NotificationStatus(notification.status)
    if current not in RANK:
        return False
    if update_.status == "failed":
        if current is not NotificationStatus.SENT:
            return False
        notification.error_code = update_.error_code or "META_UNKNOWN"
        notification.last_error = update_.error_text or "failed (no error detail from the provider)"
        notification.failed_at = update_.at
        template = (templates or {}).get(notification.category)
        payload = notification.payload or {}
        if notification.error_code == "META_131047" and template and "template" not in payload:
            parameters = [notification.body[:1000]] if template.get("body_parameter", True) else []
            notification.payload = {**payload, "template": {**template, "parameters": parameters}}
            notification.status = NotificationStatus.PENDING.value
            notification.error_kind = "WINDOW_CLOSED"
            notification.next_attempt_at = update_.at
        else:
            notification.status = NotificationStatus.FAILED_PERMANENT.value
            notification.error_kind = "PERMANENT"
            notification.next_attempt_at = None
    else:
        target = RANKED_STATUSES.get(update_.status)
        if target is None or RANK[target] < RANK[current]:
            return False
        notification.status = target.value
        if target is NotificationStatus.DELIVERED:
            notification.delivered_at = _earliest(notification.delivered_at, update_.at)
        elif target is NotificationStatus.READ:
            notification.read_at = _earliest(notification.read_at, update_.at)
    if notification.status_at is None or update_.at > notification.status_at:
        notification.status_at = update_.at
    return True


def _earliest(current: datetime | None, new: datetime) -> datetime:
    return new if current is None or new < current else current


async def apply_statuses(
    session: AsyncSession,
    statuses: list[StatusUpdate],
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """Apply every status to the notifications it names (locked in one order); returns how many named
    no known notification."""
    unmatched = 0
    wamids = sorted({status.wamid for status in statuses})
    found: dict[str, list[Notification]] = {}
    for start in range(0, len(wamids), 500):
        chunk = wamids[start : start + 500]
        # Locked in one order (provider id, id) so that concurrent deliveries cannot deadlock, and so
        # that two updates of one message never both read the old status.
        query = lock_for_update(
            select(Notification)
            .where(Notification.provider_message_id.in_(chunk))
            .order_by(Notification.provider_message_id, Notification.id)
            .execution_options(populate_existing=True)
        )
        for notification in (await session.scalars(query)).all():
            found.setdefault(notification.provider_message_id or "", []).append(notification)
    for status in statuses:
        notifications = found.get(status.wamid)
        if not notifications:
            unmatched += 1
            continue
        for notification in notifications:
            apply_status(notification, status, templates)
    return unmatched
