"""Unit tests for the pure pieces of dispatchd.replay (no server, no network).

Data: the trace shipped in the package, ``dispatchd/data/nyc-2014-04-30-b02512.csv.gz``.
"""

from __future__ import annotations

import csv
import gzip
import random
from datetime import datetime
from importlib import resources
from pathlib import Path

import pytest

from dispatchd.replay import (
    SHIPPED_TRIPS,
    BoundingBox,
    ReplayOptions,
    ReplaySummary,
    Trip,
    haversine_km,
    load_trips,
    percentile,
    response_latency_trace_s,
    synthetic_drop_off,
)

SLICE_NAME = "nyc-2014-04-30-b02512.csv.gz"


@pytest.fixture(scope="module")
def shipped_slice() -> Path:
    path = Path(str(resources.files("dispatchd").joinpath("data", SLICE_NAME)))
    assert path.is_file()
    return path


def _raw_pickups(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["pickup_at", "lat", "lon", "base"]
    return [row[0] for row in rows[1:]]


def test_shipped_constant_points_at_the_packaged_slice(shipped_slice: Path) -> None:
    assert SHIPPED_TRIPS.resolve() == shipped_slice.resolve()


def test_slice_holds_one_day_of_base_b02512(shipped_slice: Path) -> None:
    pickups = _raw_pickups(shipped_slice)
    assert len(pickups) == 2186
    assert all(pickup.startswith("2014-04-30") for pickup in pickups)


def test_load_trips_without_bounds_reads_every_row_in_time_order(shipped_slice: Path) -> None:
    trips = load_trips(shipped_slice, None, None)
    assert len(trips) == len(_raw_pickups(shipped_slice))
    assert [trip.pickup_at for trip in trips] == sorted(trip.pickup_at for trip in trips)
    assert trips[0] == Trip(datetime(2014, 4, 30, 0, 2), 40.6444, -73.7823)


def test_load_trips_keeps_start_inclusive_end_exclusive(shipped_slice: Path) -> None:
    start, end = datetime(2014, 4, 30, 18, 0), datetime(2014, 4, 30, 19, 0)
    expected = sum(
        1 for pickup in _raw_pickups(shipped_slice) if start <= datetime.fromisoformat(pickup) < end
    )
    trips = load_trips(shipped_slice, start, end)
    assert expected > 0
    assert len(trips) == expected
    assert min(trip.pickup_at for trip in trips) == start
    assert all(start <= trip.pickup_at < end for trip in trips)


def test_load_trips_open_ended_bounds(shipped_slice: Path) -> None:
    cut = datetime(2014, 4, 30, 12, 0)
    before = load_trips(shipped_slice, None, cut)
    after = load_trips(shipped_slice, cut, None)
    assert before and after
    assert len(before) + len(after) == 2186
    assert before[-1].pickup_at < cut <= after[0].pickup_at


def test_load_trips_reads_plain_csv_and_sorts(tmp_path: Path) -> None:
    path = tmp_path / "trips.csv"
    path.write_text(
        "pickup_at,lat,lon,base\n2014-04-30T10:05:00,40.7,-73.9,B02512\n2014-04-30T10:01:00,40.8,-73.95,B02512\n"
    )
    trips = load_trips(path, None, None)
    assert [trip.pickup_at.minute for trip in trips] == [1, 5]
    assert trips[0].lat == pytest.approx(40.8)


def test_load_trips_rejects_missing_column_and_aware_bound(tmp_path: Path, shipped_slice: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("pickup_at,lat\n2014-04-30T10:05:00,40.7\n")
    with pytest.raises(ValueError, match="lon"):
        load_trips(path, None, None)
    with pytest.raises(ValueError, match="naive"):
        load_trips(shipped_slice, datetime.fromisoformat("2014-04-30T18:00:00+00:00"), None)


def test_percentile_linear_interpolation() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 40) == pytest.approx(29.0)
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_haversine_known_distance() -> None:
    # JFK to LaGuardia airports, about 17 km apart.
    assert haversine_km(40.6413, -73.7781, 40.7769, -73.8740) == pytest.approx(17.1, abs=0.3)
    assert haversine_km(40.7, -73.9, 40.7, -73.9) == 0.0


@pytest.mark.parametrize(
    ("start", "end"), [(None, None), (datetime(2014, 4, 30, 18), datetime(2014, 4, 30, 19))]
)
def test_synthetic_drop_off_is_1_to_8_km_away_inside_the_box(
    shipped_slice: Path, start: datetime | None, end: datetime | None
) -> None:
    trips = load_trips(shipped_slice, start, end)
    box = BoundingBox.around(trips)
    rng = random.Random(7)
    distances = []
    for trip in trips:
        drop = synthetic_drop_off(rng, trip.lat, trip.lon, box)
        assert box.contains(*drop)
        distances.append(haversine_km(trip.lat, trip.lon, *drop))
    assert min(distances) >= 1.0 - 1e-6
    assert max(distances) <= 8.0 + 1e-6
    assert max(distances) - min(distances) > 5.0


def test_synthetic_drop_off_is_reproducible_for_a_seed() -> None:
    box = BoundingBox.around([Trip(datetime(2014, 4, 30), 40.75, -73.98)])
    first = synthetic_drop_off(random.Random(3), 40.75, -73.98, box)
    again = synthetic_drop_off(random.Random(3), 40.75, -73.98, box)
    assert first == again
    assert 1.0 <= haversine_km(40.75, -73.98, *first) <= 8.0


def test_bounding_box_widens_a_single_point() -> None:
    box = BoundingBox.around([Trip(datetime(2014, 4, 30), 40.75, -73.98)])
    assert box.max_lat - box.min_lat == pytest.approx(0.1)
    assert box.max_lon - box.min_lon == pytest.approx(0.1)
    assert box.contains(40.75, -73.98)
    with pytest.raises(ValueError):
        BoundingBox.around([])


def test_response_latency_is_capped_below_25_trace_seconds() -> None:
    rng = random.Random(1)
    latencies = sorted(response_latency_trace_s(rng) for _ in range(5000))
    assert max(latencies) < 25.0
    assert latencies[0] > 0.0
    assert percentile(latencies, 50) == pytest.approx(6.0, rel=0.1)


def test_replay_options_reject_bad_values() -> None:
    common = {
        "trips_path": SHIPPED_TRIPS,
        "url": "http://127.0.0.1:8000",
        "api_key": "k",
        "start": None,
        "end": None,
    }
    assert ReplayOptions(**common, speed=60, drivers=10).seed == 7
    with pytest.raises(ValueError):
        ReplayOptions(**common, speed=0, drivers=10)
    with pytest.raises(ValueError):
        ReplayOptions(**common, speed=60, drivers=10, ignore_probability=1.5)


def _summary(**overrides: object) -> ReplaySummary:
    values: dict[str, object] = {
        "trips": 3,
        "drivers": 2,
        "bookings": 3,
        "assigned": 2,
        "completed": 1,
        "timed_out": 1,
        "cancelled": 0,
        "still_searching": 0,
        "time_to_assign_p50_s": 1.5,
        "time_to_assign_p95_s": 2.0,
        "time_to_assign_p99_s": 2.1,
        "double_assignments": 0,
        "drivers_double_booked": 0,
        "notifications_written": 12,
        "offers_sent": 6,
        "offers_accepted": 2,
        "offers_rejected": 2,
        "offers_timed_out": 2,
        "offers_ignored": 1,
        "elapsed_s": 4.2,
    }
    values.update(overrides)
    return ReplaySummary(**values)  # type: ignore[arg-type]


def test_summary_as_dict_keys_and_values() -> None:
    data = _summary(responses_by_action={"ASSIGNED": 2}).as_dict()
    required = {
        "bookings",
        "assigned",
        "timed_out",
        "cancelled",
        "still_searching",
        "time_to_assign_p50_s",
        "time_to_assign_p95_s",
        "time_to_assign_p99_s",
        "double_assignments",
        "drivers_double_booked",
        "notifications_written",
        "offers_sent",
        "offers_accepted",
        "offers_rejected",
        "offers_timed_out",
        "elapsed_s",
    }
    assert required <= set(data)
    assert data["bookings"] == 3
    assert data["responses_by_action"] == {"ASSIGNED": 2}
    assert data["aborted"] is None


def test_summary_ok_only_without_double_assignment() -> None:
    assert _summary().ok
    assert not _summary(double_assignments=1).ok
    assert not _summary(drivers_double_booked=1).ok
    assert not _summary(aborted="no trips").ok


def test_summary_render_prints_the_counts() -> None:
    from rich.console import Console

    console = Console(record=True, width=100)
    _summary(double_assignments=1, http_errors={"HTTP 409 INVALID_STATE": 4}).render(console)
    text = console.export_text()
    assert "double assignments" in text
    assert "HTTP 409 INVALID_STATE" in text
    assert "1.50 s" in text
