"""Great-circle geometry on the WGS84 sphere: distances (haversine, mean Earth radius 6371.0088 km) and
bounding boxes. Degrees in, kilometres out; no I/O. Used by matching (who is near a pickup) and by the
replay (where simulated drivers go)."""

from __future__ import annotations

import math

#: Mean Earth radius (IUGG), in km.
EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Distance in km between two WGS84 points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lon: float, radius_km: float) -> tuple[float, float, float, float]:
    """``(min_lat, max_lat, min_lon, max_lon)`` in degrees enclosing every point within ``radius_km`` of
    ``(lat, lon)``: a cheap SQL pre-filter before the exact haversine test.

    Exact on the sphere (J. Matuschek, "Finding Points Within a Distance of a Latitude/Longitude Using
    Bounding Coordinates"): the longitude half-span is ``asin(sin δ / cos φ)``, wider than ``δ / cos φ``.
    Near a pole the box spans every longitude. It does not wrap across the antimeridian.
    """
    delta = radius_km / EARTH_RADIUS_KM
    phi = math.radians(lat)
    min_phi, max_phi = phi - delta, phi + delta
    if min_phi <= -math.pi / 2 or max_phi >= math.pi / 2 or math.sin(delta) >= math.cos(phi):
        return max(-90.0, math.degrees(min_phi)), min(90.0, math.degrees(max_phi)), -180.0, 180.0
    dlon = math.degrees(math.asin(math.sin(delta) / math.cos(phi)))
    return math.degrees(min_phi), math.degrees(max_phi), lon - dlon, lon + dlon
