"""Replay a real pickup trace against a running dispatchd server (`dispatchd replay`).

The trace is a CSV (optionally gzip) with header ``pickup_at,lat,lon,base``: ``pickup_at`` is naive local
New York time, ``lat``/``lon`` WGS84 degrees. The shipped default, ``data/nyc-2014-04-30-b02512.csv.gz``,
is one day of NYC TLC FOIL pickups (FiveThirtyEight); see ``data/README.md``.

A replay creates simulated drivers over HTTP, posts one booking per trip at the trip's trace time
(compressed by ``speed``), answers the offers the drivers receive, drives the won bookings to completion
and finally reads the server's own records to check that no booking was given to two drivers and no
driver held two bookings at once, and what the outbox did (``GET /v1/notifications/summary``).

Two fleets (``ReplayOptions.fleet``):

- ``events``: drivers learn their offers from the event log (``OfferSent``) and answer through
  ``POST /v1/bookings/{id}/responses``, as a driver app connected to the server would;
- ``whatsapp``: drivers see only what the outbox actually sent. The server sends through the
  ``whatsapp_cloud`` channel to the fake WhatsApp Cloud API (:mod:`dispatchd.testing.fake_whatsapp`);
  the replay reads the fake's ``GET /messages``, and a driver answers an offer message by tapping one of
  its buttons (or list rows): a signed Meta webhook to ``POST /v1/webhooks/whatsapp``. Time to assign is
  then what a WhatsApp-only fleet gets, pacing and coalescing included.

Pure pieces (``load_trips``, ``percentile``, ``haversine_km``, ``synthetic_drop_off``, ``BoundingBox``,
``ReplaySummary``, ``offers_in_message``, ``choose_reply``, ``webhook_reply_payload``, ``sign_webhook``)
have no I/O beyond reading the trace and are unit-tested on their own.

The package, by responsibility: :mod:`dispatchd.replay.trace` (the trace, its bounding box, drop-offs and
the drivers' timing), :mod:`dispatchd.replay.whatsapp` (offer messages read from the fake, the taps
sent back as signed webhooks), :mod:`dispatchd.replay.summary` (``ReplayOptions``, ``ReplaySummary``),
:mod:`dispatchd.replay.base` (the replay's state, HTTP calls and tasks), :mod:`dispatchd.replay.fleets`
(the simulated drivers of both fleets) and :mod:`dispatchd.replay.runner` (``run_replay``: setup,
bookings, outbox, read-back). Every public name is re-exported here.
"""

from __future__ import annotations

from dispatchd.core.geo import EARTH_RADIUS_KM, haversine_km
from dispatchd.core.stats import percentile
from dispatchd.replay.base import ASSIGNED_STATUSES, FINAL_STATUSES
from dispatchd.replay.runner import HEARTBEAT_EVERY_TRACE_S, HEARTBEATS_PER_S_MAX, run_replay
from dispatchd.replay.summary import FLEETS, ReplayOptions, ReplaySummary
from dispatchd.replay.trace import (
    DRIVER_SPEED_KMH,
    DROP_OFF_MAX_KM,
    DROP_OFF_MIN_KM,
    MIN_BOX_SPAN_DEG,
    RESPONSE_LATENCY_CAP_TRACE_S,
    RESPONSE_LATENCY_MEDIAN_TRACE_S,
    RESPONSE_LATENCY_SIGMA,
    SHIPPED_TRIPS,
    BoundingBox,
    Trip,
    destination_point,
    load_trips,
    response_latency_trace_s,
    synthetic_drop_off,
    trip_duration_trace_s,
)
from dispatchd.replay.whatsapp import (
    BUSINESS_DISPLAY_PHONE,
    OFFER_REPLY_ID,
    SIGNATURE_HEADER,
    WEBHOOK_PATH,
    OfferChoice,
    WhatsAppOffer,
    choose_reply,
    offers_in_message,
    sign_webhook,
    webhook_reply_payload,
)

__all__ = [
    "ASSIGNED_STATUSES",
    "BUSINESS_DISPLAY_PHONE",
    "DRIVER_SPEED_KMH",
    "DROP_OFF_MAX_KM",
    "DROP_OFF_MIN_KM",
    "EARTH_RADIUS_KM",
    "FINAL_STATUSES",
    "FLEETS",
    "HEARTBEATS_PER_S_MAX",
    "HEARTBEAT_EVERY_TRACE_S",
    "MIN_BOX_SPAN_DEG",
    "OFFER_REPLY_ID",
    "RESPONSE_LATENCY_CAP_TRACE_S",
    "RESPONSE_LATENCY_MEDIAN_TRACE_S",
    "RESPONSE_LATENCY_SIGMA",
    "SHIPPED_TRIPS",
    "SIGNATURE_HEADER",
    "WEBHOOK_PATH",
    "BoundingBox",
    "OfferChoice",
    "ReplayOptions",
    "ReplaySummary",
    "Trip",
    "WhatsAppOffer",
    "choose_reply",
    "destination_point",
    "haversine_km",
    "load_trips",
    "offers_in_message",
    "percentile",
    "response_latency_trace_s",
    "run_replay",
    "sign_webhook",
    "synthetic_drop_off",
    "trip_duration_trace_s",
    "webhook_reply_payload",
]
