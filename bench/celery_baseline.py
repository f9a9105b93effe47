"""The seed's stack as a baseline: one Celery task per notification, Redis as the broker (seed 004).

``send_notification(notification_id, recipient, body)`` POSTs the same Cloud API JSON as dispatchd's
``whatsapp_cloud`` channel (sync httpx) to ``BENCH_FAKE_WHATSAPP_URL`` (``.../v21.0``). Transient
failures (HTTP 429 / 5xx, Meta error codes of the TEMPORARY kind, transport errors) are retried by
``autoretry_for`` after ``BENCH_CELERY_RETRY_S`` seconds (0.05 by default), at most 10 times; other 4xx
answers fail the task. ``acks_late=True``: a message is acknowledged only after its task ran, so a killed
worker's messages go back to the queue once Redis's ``visibility_timeout`` (5 s here, 1 h by default)
has passed. The restore sweep runs every second (``unacked_restore_interval`` / ``_throttle``) so the
benchmark does not wait kombu's default ~100 s.

Worker: ``celery -A bench.celery_baseline worker -P prefork --concurrency 16`` (the best of the pools
tried on 2 cores, see ``bench/bench_notifications.py``). The broker is ``BENCH_CELERY_BROKER`` (``redis://127.0.0.1:6379/15``).
When ``BENCH_CELERY_READY_FILE`` is set, the worker creates that file once it is ready.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
from celery import Celery
from celery.signals import worker_ready

BROKER_URL = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/15")
FAKE_URL = os.environ.get("BENCH_FAKE_WHATSAPP_URL", "http://127.0.0.1:8999/v21.0")
PHONE_NUMBER_ID = os.environ.get("BENCH_WHATSAPP_PHONE_NUMBER_ID", "1234567890")
ACCESS_TOKEN = "fake-token"
RETRY_COUNTDOWN_S = float(os.environ.get("BENCH_CELERY_RETRY_S", "0.05"))
VISIBILITY_TIMEOUT_S = 5
#: Meta error codes a retry may cure (the TEMPORARY rows of dispatchd's classify table).
TEMPORARY_META_CODES = frozenset({1, 2, 4, 80007, 130429, 131000, 131016, 131056, 131057})

app = Celery("bench.celery_baseline", broker=BROKER_URL)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)


class TransientError(Exception):
    """A failure worth retrying (the seed's "temporaire")."""


class PermanentError(Exception):
    """A failure no retry cures (the seed's "permanent")."""


_local = threading.local()


def _client() -> httpx.Client:
    """One HTTP client per thread and process (never shared across a fork)."""
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != os.getpid():
        client = _local.client = httpx.Client(timeout=10.0)
        _local.pid = os.getpid()
    return client


def payload(notification_id: str, recipient: str, body: str) -> dict:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": recipient.strip().removeprefix("+"),
        "biz_opaque_callback_data": notification_id,
        "type": "text",
        "text": {"preview_url": False, "body": body[:4096]},
    }


@app.task(
    name="send_notification",
    acks_late=True,
    ignore_result=True,
    autoretry_for=(TransientError, httpx.TransportError),
    retry_kwargs={"max_retries": 10, "countdown": RETRY_COUNTDOWN_S},
    retry_backoff=False,
    retry_jitter=False,
)
def send_notification(notification_id: str, recipient: str, body: str) -> str:
    """POST one message; return its wamid, raise :class:`TransientError` (retried) or PermanentError."""
    response = _client().post(
        f"{FAKE_URL.rstrip('/')}/{PHONE_NUMBER_ID}/messages",
        json=payload(notification_id, recipient, body),
        headers={"Authorization": f"Bearer {ACCESS_TOKEN}"},
    )
    if response.is_success:
        return response.json()["messages"][0]["id"]
    try:
        code = response.json().get("error", {}).get("code")
    except ValueError:
        code = None
    if code in TEMPORARY_META_CODES or response.status_code in (429, 500, 502, 503, 504):
        raise TransientError(f"HTTP {response.status_code} (Meta {code})")
    raise PermanentError(f"HTTP {response.status_code} (Meta {code})")


@worker_ready.connect
def _ready(**_: object) -> None:
    path = os.environ.get("BENCH_CELERY_READY_FILE")
    if path:
        Path(path).touch()
