"""Zones of the matching metrics (seed 000 §6.1 getMetricsByZone): where a booking's pickup lies.

A zone is a named polygon of ``DISPATCHD_ZONES_GEOJSON`` (a GeoJSON FeatureCollection of Polygon or
MultiPolygon features, each with ``properties.name``; WGS84 longitude/latitude as GeoJSON orders them),
the first that contains the pickup in the file's order; else the pickup's geohash cell of
``DISPATCHD_ZONE_GEOHASH_PRECISION`` characters (5 = about 4.9 km × 4.9 km). A booking without a pickup
position is in no zone (``None``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pygeohash
import shapely
from shapely.geometry import Point, shape
from shapely.geometry.base import BaseGeometry

#: The zone name of a booking with no pickup position.
UNKNOWN_ZONE = "unknown"


@dataclass(frozen=True)
class Zones:
    """``polygons``: ``(name, geometry)`` pairs, tried in order; ``precision``: geohash length (1–12)."""

    precision: int = 5
    polygons: tuple[tuple[str, BaseGeometry], ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= self.precision <= 12:
            raise ValueError("geohash precision must be between 1 and 12")
        for _, geometry in self.polygons:
            shapely.prepare(geometry)  # fast repeated contains()

    def zone_of(self, lat: float | None, lon: float | None) -> str | None:
        """The zone of a point (WGS84 degrees): a polygon's name, else its geohash cell; None when the
        position is unknown."""
        if lat is None or lon is None:
            return None
        if self.polygons:
            point = Point(lon, lat)
            for name, geometry in self.polygons:
                if geometry.covers(point):
                    return name
        return pygeohash.encode(lat, lon, precision=self.precision)


def load_zones(path: str | Path | None, precision: int = 5) -> Zones:
    """:class:`Zones` from a GeoJSON file (None: geohash cells only). Raises :class:`ValueError` naming the
    file and the feature when the file is unreadable, not a FeatureCollection, or a feature has no name
    or is not a valid Polygon / MultiPolygon."""
    if path is None:
        return Zones(precision)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"zones file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise ValueError(f"zones file {path}: not a GeoJSON FeatureCollection")
    polygons = []
    for index, feature in enumerate(data.get("features") or []):
        name = ((feature or {}).get("properties") or {}).get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"zones file {path}: feature {index} has no properties.name")
        try:
            geometry = shape(feature.get("geometry"))
        except Exception as exc:  # shapely raises several kinds for bad GeoJSON
            raise ValueError(f"zones file {path}: feature {index} ({name}): {exc}") from None
        if geometry.geom_type not in ("Polygon", "MultiPolygon") or not geometry.is_valid:
            raise ValueError(f"zones file {path}: feature {index} ({name}) is not a valid (Multi)Polygon")
        polygons.append((name.strip(), geometry))
    return Zones(precision, tuple(polygons))
