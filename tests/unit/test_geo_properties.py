"""The SQL pre-filter must never drop a driver who is within the radius."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core.geo import bounding_box, haversine_km

latitudes = st.floats(min_value=-80, max_value=80, allow_nan=False)
longitudes = st.floats(min_value=-179, max_value=179, allow_nan=False)


@given(latitudes, longitudes, st.floats(min_value=0.1, max_value=500), st.floats(0, 360), st.floats(0, 1))
def test_every_point_within_the_radius_is_inside_the_box(lat, lon, radius_km, bearing, fraction):
    distance = radius_km * fraction
    # destination point at `distance` along `bearing` on the sphere
    delta = distance / 6371.0088
    theta, phi1, lmb1 = math.radians(bearing), math.radians(lat), math.radians(lon)
    phi2 = math.asin(math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta))
    lmb2 = lmb1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1), math.cos(delta) - math.sin(phi1) * math.sin(phi2)
    )
    point_lat, point_lon = math.degrees(phi2), math.degrees(lmb2)
    if not -180 <= point_lon <= 180:  # across the antimeridian: the box does not wrap (no service there)
        return
    min_lat, max_lat, min_lon, max_lon = bounding_box(lat, lon, radius_km)
    assert haversine_km(lat, lon, point_lat, point_lon) <= radius_km + 1e-6
    assert min_lat - 1e-9 <= point_lat <= max_lat + 1e-9
    assert min_lon - 1e-9 <= point_lon <= max_lon + 1e-9


def test_haversine_known_distance():
    # Dakar Plateau to AIBD airport: about 39 km as the crow flies
    assert 38 < haversine_km(14.6681, -17.4312, 14.6700, -17.0733) < 40


def test_the_box_holds_the_whole_circle_even_far_north():
    for lat in (0.0, 45.0, 70.0, 80.0):
        for radius_km in (5.0, 100.0, 500.0):
            min_lat, max_lat, min_lon, max_lon = bounding_box(lat, 10.0, radius_km)
            delta = radius_km / 6371.0088
            for step in range(720):
                theta, phi1 = math.radians(step / 2), math.radians(lat)
                phi2 = math.asin(
                    math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta)
                )
                lon2 = 10.0 + math.degrees(
                    math.atan2(
                        math.sin(theta) * math.sin(delta) * math.cos(phi1),
                        math.cos(delta) - math.sin(phi1) * math.sin(phi2),
                    )
                )
                assert min_lat - 1e-9 <= math.degrees(phi2) <= max_lat + 1e-9
                assert min_lon - 1e-9 <= lon2 <= max_lon + 1e-9, (lat, radius_km, step)
