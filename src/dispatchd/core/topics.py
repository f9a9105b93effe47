"""Topic names of the event log, built in one place, and who may read them.

A topic is ``<kind>:<id>``: ``booking:bkg_…``, ``driver:drv_…``, ``resource:res_…``,
``conversation:cnv_…`` and ``agent:agt_…``; or one of the staff-only topics ``alerts`` (admin alerts)
and ``notifications`` (the outbox's delivery changes). A subject-bound key (role ``driver`` or
``agent``) carries its subject as a topic name (``driver:drv_…``) and may read exactly that topic.
Staff read everything and may ask for patterns: ``booking:*`` (every booking topic), ``*``
(everything). Used by ``GET /v1/events`` and the realtime streams through :meth:`Principal.may_read`.
"""

from __future__ import annotations

import fnmatch
import re

BOOKING = "booking"
DRIVER = "driver"
RESOURCE = "resource"
CONVERSATION = "conversation"
AGENT = "agent"

#: staff-only topics without an id: admin alerts as they are raised, and the outbox's delivery changes
ALERTS = "alerts"
NOTIFICATIONS = "notifications"
SINGLETONS = (ALERTS, NOTIFICATIONS)

#: kinds a key can be bound to (``api_keys.subject``), with the role that binds it
SUBJECT_KINDS = (DRIVER, AGENT)

#: ``kind:id``; an id is what its domain allows (resource ids may hold ``.`` and ``:``), never a space
#: or a ``*``; 200 characters at most, as the event log's column
_TOPIC = re.compile(r"^[a-z_]+:[^\s*]+$")
#: ``*``, or a topic prefix ending with one ``*``: ``booking:*``, ``resource:room.*``
_PATTERN = re.compile(r"^(\*|[a-z_]+:[^\s*]*\*)$")
TOPIC_MAX = 200


def topic(kind: str, row_id: str) -> str:
    return f"{kind}:{row_id}"


def booking(booking_id: str) -> str:
    return topic(BOOKING, booking_id)


def driver(driver_id: str) -> str:
    return topic(DRIVER, driver_id)


def resource(resource_id: str) -> str:
    return topic(RESOURCE, resource_id)


def conversation(conversation_id: str) -> str:
    return topic(CONVERSATION, conversation_id)


def agent(agent_id: str) -> str:
    return topic(AGENT, agent_id)


def split(name: str) -> tuple[str, str]:
    """``"driver:drv_1"`` → ``("driver", "drv_1")``; raises :class:`ValueError` when not ``kind:id``."""
    if not _TOPIC.match(name):
        raise ValueError(f"{name!r} is not a topic (kind:id)")
    kind, _, row_id = name.partition(":")
    return kind, row_id


def is_pattern(name: str) -> bool:
    return "*" in name


def is_valid(name: str, *, pattern: bool = False) -> bool:
    """A topic name, or with ``pattern`` also a pattern (``*``, ``kind:*``, ``kind:prefix*``)."""
    if len(name) > TOPIC_MAX:
        return False
    return bool(name in SINGLETONS or _TOPIC.match(name) or (pattern and _PATTERN.match(name)))


def matches(pattern: str, name: str) -> bool:
    """Whether topic ``name`` falls under ``pattern`` (a topic matches only itself)."""
    return fnmatch.fnmatchcase(name, pattern) if is_pattern(pattern) else pattern == name
