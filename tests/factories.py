"""Small helpers that create the rows many tests need: drivers, bookings, resources, API keys.

Two families:

- ``create_*(services, …)`` go through the domain services of a :class:`dispatchd.app.Services`
  (no HTTP), and return the ORM rows;
- ``post_*(http, …)`` go through the API with an ``httpx.AsyncClient`` that carries an admin key (the
  ``client`` fixture, or a client on ``live_server``), check the ``201`` and return the JSON or the id.

Field defaults come from :func:`tests.conftest.driver_data` and :func:`tests.conftest.booking_data`
(a new phone number each time); keyword arguments override them.
"""

from __future__ import annotations

from typing import Any

import httpx

from dispatchd.app import Services
from dispatchd.matching.models import Booking, Driver
from dispatchd.reservations.models import Resource
from tests.conftest import booking_data, driver_data

# --- through the services ---------------------------------------------------------------------------


async def create_driver(services: Services, **overrides: Any) -> Driver:
    """A registered driver (AVAILABLE near the default pickup unless overridden)."""
    return await services.matching.create_driver(driver_data(**overrides))


async def create_drivers(services: Services, count: int, **overrides: Any) -> list[Driver]:
    """``count`` drivers, created one after the other (same overrides, each with its own phone)."""
    return [await create_driver(services, **overrides) for _ in range(count)]


async def create_booking(services: Services, **overrides: Any) -> Booking:
    """A PENDING booking (matching not started)."""
    return await services.matching.create_booking(booking_data(**overrides))


async def create_bookings(services: Services, count: int, **overrides: Any) -> list[Booking]:
    """``count`` PENDING bookings, created one after the other."""
    return [await create_booking(services, **overrides) for _ in range(count)]


async def create_resource(
    services: Services, capacity: int, *, actor: str = "test", **fields: Any
) -> Resource:
    """An OPEN resource of ``capacity`` places (``type``/``name`` default to a bus seat)."""
    data = {"type": "seat", "name": "Bus 12", "capacity": capacity, **fields}
    return await services.reservations.create_resource(data, actor)


# --- through the API (admin client) -----------------------------------------------------------------


def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


async def post_driver(http: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    """``POST /v1/drivers``; the created driver's JSON."""
    return _created(await http.post("/v1/drivers", json=driver_data(**overrides)))


async def post_booking(http: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    """``POST /v1/bookings``; the created booking's JSON (PENDING)."""
    return _created(await http.post("/v1/bookings", json=booking_data(**overrides)))


async def post_api_key(http: httpx.AsyncClient, role: str, driver_id: str | None = None) -> dict[str, Any]:
    """``POST /v1/api-keys`` for ``role`` (``admin``, ``integration``, or ``driver`` with its
    ``driver_id``); the JSON, with ``id`` and the plaintext ``key``."""
    body: dict[str, Any] = {"role": role}
    if driver_id is not None:
        body["driver_id"] = driver_id
    return _created(await http.post("/v1/api-keys", json=body))


async def post_driver_with_key(http: httpx.AsyncClient, **overrides: Any) -> tuple[str, str]:
    """A new driver and a ``driver`` key bound to it: ``(driver id, plaintext key)``."""
    driver_id = (await post_driver(http, **overrides))["id"]
    return driver_id, (await post_api_key(http, "driver", driver_id))["key"]


async def post_resource(http: httpx.AsyncClient, capacity: int, **extra: Any) -> str:
    """``POST /v1/resources`` (a bus seat of ``capacity`` places unless overridden); the new id."""
    created = await http.post(
        "/v1/resources", json={"type": "seat", "name": "Bus 12", "capacity": capacity, **extra}
    )
    return _created(created)["id"]
