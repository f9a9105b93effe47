"""Structured JSON logs (structlog) with a correlation id bound per request, phone numbers masked.

``request_id`` comes from the ``X-Request-ID`` header when the caller sends one, else is generated, and
is echoed back; every log line written while serving that request carries it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from dispatchd.core.phone import mask_phones


def redact_phones(logger: object, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every phone number in a log line's text values (the message, fields, the
    formatted traceback) masked as ``+2217…4567`` (:func:`dispatchd.core.phone.mask_phones`)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = mask_phones(value)
        elif isinstance(value, list | tuple | dict):
            event_dict[key] = mask_phones(str(value))
    return event_dict


def configure_logging(level: str = "INFO", *, json: bool = True) -> None:
    """Route stdlib and structlog output to stderr as one JSON object per line (or console text)."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_phones, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_phones,
                renderer,
            ],
            foreign_pre_chain=[*shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "sqlalchemy.engine", "aiosqlite", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
