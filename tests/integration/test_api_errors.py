"""Bad input gets RFC 9457 problem+json with a stable code, and changes nothing."""

from __future__ import annotations

import pytest

from tests.conftest import booking_data, driver_data
from tests.factories import post_api_key, post_booking, post_driver_with_key


async def _state(client) -> tuple[int, int]:
    """(last event id, notifications total): unchanged means nothing was written."""
    events = (await client.get("/v1/events", params={"after": 0, "limit": 1000})).json()["events"]
    total = (await client.get("/v1/notifications")).json()["total"]
    return (events[-1]["id"] if events else 0), total


def _assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status
    assert {"type", "title", "detail", "instance"} <= set(body)
    assert "Traceback" not in response.text
    return body


@pytest.fixture
async def searching(client):
    """Two drivers with their own keys and one booking being matched."""
    drivers = [await post_driver_with_key(client) for _ in range(2)]
    booking = await post_booking(client)
    assert (await client.post(f"/v1/bookings/{booking['id']}/matching")).status_code == 200
    return booking["id"], drivers


async def test_missing_or_wrong_key_is_401(client):
    no_key = await client.get("/v1/drivers", headers={"Authorization": ""})
    _assert_problem(no_key, 401, "UNAUTHORIZED")
    wrong = await client.get("/v1/drivers", headers={"Authorization": "Bearer dk_nope"})
    _assert_problem(wrong, 401, "UNAUTHORIZED")


async def test_unknown_ids_are_404_with_their_code(client, searching):
    booking_id, [(driver_id, _), _] = searching
    before = await _state(client)
    _assert_problem(await client.get("/v1/bookings/bkg_missing"), 404, "BOOKING_NOT_FOUND")
    _assert_problem(await client.get("/v1/drivers/drv_missing"), 404, "DRIVER_NOT_FOUND")
    _assert_problem(
        await client.post(
            "/v1/bookings/bkg_missing/responses", json={"driver_id": driver_id, "type": "ACCEPT"}
        ),
        404,
        "BOOKING_NOT_FOUND",
    )
    _assert_problem(
        await client.post(
            f"/v1/bookings/{booking_id}/responses", json={"driver_id": "drv_x", "type": "ACCEPT"}
        ),
        404,
        "OFFER_NOT_FOUND",
    )
    _assert_problem(await client.post("/v1/bookings/bkg_missing/matching"), 404, "BOOKING_NOT_FOUND")
    _assert_problem(await client.get("/v1/resources/res_missing"), 404, "RESOURCE_NOT_FOUND")
    _assert_problem(await client.get("/v1/reservations/rsv_missing"), 404, "RESERVATION_NOT_FOUND")
    _assert_problem(await client.post("/v1/reservations/rsv_missing/cancel"), 404, "RESERVATION_NOT_FOUND")
    for method, path in (
        ("GET", "/v1/waiting-list/wle_missing"),
        ("POST", "/v1/waiting-list/wle_missing/confirm"),
        ("DELETE", "/v1/waiting-list/wle_missing"),
    ):
        _assert_problem(await client.request(method, path), 404, "WAITING_LIST_ENTRY_NOT_FOUND")
    _assert_problem(await client.post("/v1/notifications/ntf_missing/retry"), 404, "NOTIFICATION_NOT_FOUND")
    _assert_problem(await client.get("/v1/nowhere"), 404, "NOT_FOUND")
    assert await _state(client) == before


async def test_matching_a_booking_twice_is_invalid_state(client, searching):
    booking_id, _ = searching
    before = await _state(client)
    body = _assert_problem(await client.post(f"/v1/bookings/{booking_id}/matching"), 409, "INVALID_STATE")
    assert "SEARCHING" in body["detail"]
    assert await _state(client) == before


async def test_malformed_json_is_400_and_schema_errors_are_422(client, searching):
    booking_id, [(driver_id, _), _] = searching
    before = await _state(client)
    malformed = await client.post(
        f"/v1/bookings/{booking_id}/responses",
        content=b'{"driver_id": ',
        headers={"Content-Type": "application/json"},
    )
    _assert_problem(malformed, 400, "MALFORMED_JSON")
    bad_type = await client.post(
        f"/v1/bookings/{booking_id}/responses", json={"driver_id": driver_id, "type": "MAYBE"}
    )
    body = _assert_problem(bad_type, 422, "VALIDATION_ERROR")
    assert body["errors"][0]["loc"] == ["body", "type"]
    _assert_problem(
        await client.post("/v1/drivers", json=driver_data(phone="0612345678")), 422, "VALIDATION_ERROR"
    )
    _assert_problem(
        await client.post("/v1/bookings", json=booking_data(pickup_lat=123)), 422, "VALIDATION_ERROR"
    )
    _assert_problem(
        await client.post("/v1/bookings", json={**booking_data(), "extra": 1}), 422, "VALIDATION_ERROR"
    )
    assert (await client.get(f"/v1/bookings/{booking_id}")).json()["status"] == "SEARCHING"
    assert await _state(client) == before


async def test_driver_key_cannot_act_for_another_driver_or_as_staff(client, searching):
    booking_id, [(driver_a, key_a), (driver_b, _)] = searching
    as_a = {"Authorization": f"Bearer {key_a}"}
    before = await _state(client)
    _assert_problem(
        await client.post(
            f"/v1/bookings/{booking_id}/responses",
            json={"driver_id": driver_b, "type": "ACCEPT"},
            headers=as_a,
        ),
        403,
        "FORBIDDEN",
    )
    _assert_problem(await client.post("/v1/bookings", json=booking_data(), headers=as_a), 403, "FORBIDDEN")
    _assert_problem(await client.post("/v1/api-keys", json={"role": "admin"}, headers=as_a), 403, "FORBIDDEN")
    _assert_problem(
        await client.patch(f"/v1/drivers/{driver_b}", json={"status": "OFFLINE"}, headers=as_a),
        403,
        "FORBIDDEN",
    )
    _assert_problem(
        await client.get("/v1/events", params={"topic": f"driver:{driver_b}"}, headers=as_a), 403, "FORBIDDEN"
    )
    assert (await client.get(f"/v1/bookings/{booking_id}")).json()["driver_id"] is None
    assert await _state(client) == before

    own = await client.post(
        f"/v1/bookings/{booking_id}/responses", json={"driver_id": driver_a, "type": "ACCEPT"}, headers=as_a
    )
    assert own.json()["action"] == "ASSIGNED"
    feed = (await client.get("/v1/events", headers=as_a)).json()["events"]
    assert {e["topic"] for e in feed} == {f"driver:{driver_a}"}


async def test_integration_key_cannot_manage_keys(client):
    integration = (await post_api_key(client, "integration"))["key"]
    headers = {"Authorization": f"Bearer {integration}"}
    assert (await client.post("/v1/bookings", json=booking_data(), headers=headers)).status_code == 201
    _assert_problem(
        await client.post("/v1/api-keys", json={"role": "admin"}, headers=headers), 403, "FORBIDDEN"
    )


async def test_revoked_key_stops_working(client):
    created = await post_api_key(client, "integration")
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await client.get("/v1/drivers", headers=headers)).status_code == 200
    assert (await client.delete(f"/v1/api-keys/{created['id']}")).json()["revoked_at"] is not None
    _assert_problem(await client.get("/v1/drivers", headers=headers), 401, "UNAUTHORIZED")


async def test_duplicate_phone_is_conflict(client):
    data = driver_data()
    assert (await client.post("/v1/drivers", json=data)).status_code == 201
    _assert_problem(await client.post("/v1/drivers", json=data), 409, "CONFLICT")


async def test_driver_holding_a_booking_cannot_go_available(client, searching):
    booking_id, [(driver_id, _), _] = searching
    await client.post(f"/v1/bookings/{booking_id}/responses", json={"driver_id": driver_id, "type": "ACCEPT"})
    _assert_problem(
        await client.patch(f"/v1/drivers/{driver_id}", json={"status": "AVAILABLE"}), 409, "INVALID_STATE"
    )
    _assert_problem(
        await client.patch(f"/v1/drivers/{driver_id}", json={"status": "BUSY"}), 422, "VALIDATION_ERROR"
    )
    _assert_problem(await client.post(f"/v1/bookings/{booking_id}/matching"), 409, "INVALID_STATE")
    completed = await client.post(f"/v1/bookings/{booking_id}/complete", json={})
    assert completed.json()["status"] == "COMPLETED"
    _assert_problem(
        await client.post(f"/v1/bookings/{booking_id}/cancel", json={"reason": "x"}), 409, "INVALID_STATE"
    )


async def test_request_id_is_echoed(client):
    response = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    problem = await client.get("/v1/bookings/bkg_missing", headers={"X-Request-ID": "req-9"})
    assert problem.json()["request_id"] == "req-9"


async def test_out_of_range_and_control_inputs_are_4xx_not_500(client, searching):
    booking_id, [(driver_id, _), _] = searching
    before = await _state(client)
    _assert_problem(await client.get("/v1/events", params={"after": 2**63}), 422, "VALIDATION_ERROR")
    _assert_problem(await client.get("/v1/notifications", params={"offset": 2**63}), 422, "VALIDATION_ERROR")
    naive = await client.get("/v1/notifications", params={"from": "2026-01-01T00:00:00"})
    _assert_problem(naive, 422, "VALIDATION_ERROR")
    _assert_problem(
        await client.get("/v1/matching/stats", params={"to": "0001-01-01T00:00:00Z"}), 422, "VALIDATION_ERROR"
    )
    ancient = booking_data(pickup_at="0001-01-01T00:00:00+05:00")
    _assert_problem(await client.post("/v1/bookings", json=ancient), 422, "VALIDATION_ERROR")
    _assert_problem(
        await client.post("/v1/drivers", json=driver_data(name="Mo\x00ussa")), 422, "VALIDATION_ERROR"
    )
    _assert_problem(
        await client.post(f"/v1/bookings/{booking_id}/cancel", json={"reason": "a\x00b"}),
        422,
        "VALIDATION_ERROR",
    )
    _assert_problem(await client.get("/v1/bookings/bkg%00x"), 400, "MALFORMED_REQUEST")
    _assert_problem(
        await client.patch(f"/v1/drivers/{driver_id}", json={"name": None}), 422, "VALIDATION_ERROR"
    )
    _assert_problem(
        await client.patch(f"/v1/drivers/{driver_id}", json={"status": None}), 422, "VALIDATION_ERROR"
    )
    assert await _state(client) == before
