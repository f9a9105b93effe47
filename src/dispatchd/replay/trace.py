"""The pickup trace and the pure pieces built on it: trips, their bounding box, synthetic drop-offs and
the simulated drivers' timing (no I/O beyond reading the trace).

The trace is a CSV (optionally gzip) with header ``pickup_at,lat,lon,base``: ``pickup_at`` is naive local
New York time, ``lat``/``lon`` WGS84 degrees. The shipped default, ``data/nyc-2014-04-30-b02512.csv.gz``,
is one day of NYC TLC FOIL pickups (FiveThirtyEight); see ``data/README.md``.
"""

from __future__ import annotations

import csv
import gzip
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dispatchd.core.geo import EARTH_RADIUS_KM, haversine_km

SHIPPED_TRIPS: Path = Path(__file__).resolve().parent.parent / "data" / "nyc-2014-04-30-b02512.csv.gz"
"""The trace shipped with the package: 2,186 pickups of 2014-04-30, base B02512 (see data/README.md)."""

DRIVER_SPEED_KMH = 25.0
RESPONSE_LATENCY_MEDIAN_TRACE_S = 6.0
RESPONSE_LATENCY_SIGMA = 0.6
RESPONSE_LATENCY_CAP_TRACE_S = 24.0
DROP_OFF_MIN_KM = 1.0
DROP_OFF_MAX_KM = 8.0
MIN_BOX_SPAN_DEG = 0.1


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


@dataclass(frozen=True)
class Trip:
    """One pickup of the trace: ``pickup_at`` naive local time of the trace, ``lat``/``lon`` WGS84 degrees."""

    pickup_at: datetime
    lat: float
    lon: float


@dataclass(frozen=True)
class BoundingBox:
    """A lat/lon box in WGS84 degrees, bounds inclusive."""

    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float

    @classmethod
    def around(cls, trips: Iterable[Trip], min_span_deg: float = MIN_BOX_SPAN_DEG) -> BoundingBox:
        """The box of the trips' pickups, widened about its centre to at least ``min_span_deg`` per side.

        The widening keeps drivers and drop-offs spread out when the selection is a single place.
        Raises ``ValueError`` when ``trips`` is empty.
        """
        trips = list(trips)
        lats = [trip.lat for trip in trips]
        lons = [trip.lon for trip in trips]
        if not lats:
            raise ValueError("no trips to bound")
        return cls(*_widen(min(lats), max(lats), min_span_deg), *_widen(min(lons), max(lons), min_span_deg))

    def contains(self, lat: float, lon: float) -> bool:
        return self.min_lat <= lat <= self.max_lat and self.min_lon <= lon <= self.max_lon

    def clamp(self, lat: float, lon: float) -> tuple[float, float]:
        return min(max(lat, self.min_lat), self.max_lat), min(max(lon, self.min_lon), self.max_lon)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.min_lat + self.max_lat) / 2, (self.min_lon + self.max_lon) / 2

    def random_point(self, rng: random.Random) -> tuple[float, float]:
        """A point drawn uniformly in lat/lon over the box."""
        return rng.uniform(self.min_lat, self.max_lat), rng.uniform(self.min_lon, self.max_lon)


def _widen(low: float, high: float, min_span: float) -> tuple[float, float]:
    if high - low >= min_span:
        return low, high
    mid = (low + high) / 2
    return mid - min_span / 2, mid + min_span / 2


def load_trips(path: Path | str, start: datetime | None = None, end: datetime | None = None) -> list[Trip]:
    """Read a trace CSV (gzip when the file starts with the gzip magic) into trips sorted by pickup time.

    Header must hold ``pickup_at`` (ISO 8601, naive local time), ``lat``, ``lon`` (WGS84 degrees); other
    columns (``base``) are ignored. Keeps ``start <= pickup_at < end`` (either bound optional, both naive
    times of the trace). Raises ``ValueError`` on a missing column, a malformed row or an aware bound.
    """
    for bound in (start, end):
        if bound is not None and bound.tzinfo is not None:
            raise ValueError("start/end must be naive local times of the trace, like pickup_at")
    path = Path(path)
    with path.open("rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    trips: list[Trip] = []
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"pickup_at", "lat", "lon"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            try:
                pickup_at = datetime.fromisoformat(row["pickup_at"])
                trip = Trip(pickup_at=pickup_at, lat=float(row["lat"]), lon=float(row["lon"]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{reader.line_num}: bad row {row!r}: {exc}") from exc
            if start is not None and pickup_at < start:
                continue
            if end is not None and pickup_at >= end:
                continue
            trips.append(trip)
    trips.sort(key=lambda trip: trip.pickup_at)
    return trips


def destination_point(lat: float, lon: float, bearing_deg: float, distance_km: float) -> tuple[float, float]:
    """The point ``distance_km`` from ``(lat, lon)`` along initial ``bearing_deg`` (0 = north), degrees."""
    delta = distance_km / EARTH_RADIUS_KM
    theta = math.radians(bearing_deg)
    phi1, lmb1 = math.radians(lat), math.radians(lon)
    phi2 = math.asin(math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta))
    lmb2 = lmb1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1), math.cos(delta) - math.sin(phi1) * math.sin(phi2)
    )
    return math.degrees(phi2), (math.degrees(lmb2) + 540) % 360 - 180


def synthetic_drop_off(
    rng: random.Random,
    lat: float,
    lon: float,
    box: BoundingBox,
    min_km: float = DROP_OFF_MIN_KM,
    max_km: float = DROP_OFF_MAX_KM,
) -> tuple[float, float]:
    """A drop-off ``min_km``–``max_km`` (uniform) from the pickup in a random direction, inside ``box``.

    Tries random bearings first; when none lands in the box (pickup in a corner) it heads for the box
    centre, and only clamps to the box as a last resort, so the distance stays within bounds whenever
    the box has room for it. Returns ``(lat, lon)`` in degrees.
    """
    distance = rng.uniform(min_km, max_km)
    for _ in range(32):
        drop = destination_point(lat, lon, rng.uniform(0.0, 360.0), distance)
        if box.contains(*drop):
            return drop
    c_lat, c_lon = box.centre
    to_centre = haversine_km(lat, lon, c_lat, c_lon)
    distance = min(distance, max(min_km, to_centre))
    return box.clamp(*destination_point(lat, lon, _bearing_deg(lat, lon, c_lat, c_lon), distance))


def _bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dlmb = math.radians(lon2 - lon1)
    y = math.sin(dlmb) * math.cos(phi2)
    x = math.cos(phi1) * math.sin(phi2) - math.sin(phi1) * math.cos(phi2) * math.cos(dlmb)
    return math.degrees(math.atan2(y, x)) % 360


def response_latency_trace_s(rng: random.Random) -> float:
    """A driver's reaction time to an offer, in trace seconds: lognormal, median 6 s, capped at 24 s."""
    latency = rng.lognormvariate(math.log(RESPONSE_LATENCY_MEDIAN_TRACE_S), RESPONSE_LATENCY_SIGMA)
    return min(latency, RESPONSE_LATENCY_CAP_TRACE_S)


def trip_duration_trace_s(distance_km: float) -> float:
    """Trace seconds a simulated driver needs for ``distance_km`` at 25 km/h."""
    return distance_km / DRIVER_SPEED_KMH * 3600.0
