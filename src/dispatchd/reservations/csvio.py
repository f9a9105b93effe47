"""CSV import of resources and export of reservations (seed 003 §4.4).

Import columns (header required): ``type,name,capacity`` and optionally ``id``, ``state`` (OPEN/CLOSED),
``metadata`` (a JSON object). Every row is validated first; any error stops the import with its line
number, and nothing is written (one transaction for the whole file).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dispatchd.reservations.models import Reservation, ResourceState
from dispatchd.reservations.schemas import ResourceCreate

EXPORT_COLUMNS = ["id", "resource_id", "client_id", "quantity", "status", "created_at", "cancelled_at"]
REQUIRED = ("type", "name", "capacity")
OPTIONAL = ("id", "state", "metadata")


def reservation_row(reservation: Reservation) -> list[Any]:
    """One export line, in :data:`EXPORT_COLUMNS` order (times ISO 8601 UTC)."""
    return [
        reservation.id,
        reservation.resource_id,
        reservation.client_id,
        reservation.quantity,
        reservation.status,
        reservation.created_at.isoformat(),
        reservation.cancelled_at.isoformat() if reservation.cancelled_at else "",
    ]


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def parse_resources(path: Path) -> tuple[list[dict[str, Any]], list[RowError]]:
    """Read and validate every row; return ``(rows ready for import, errors)`` — import only if no error.

    Line numbers count the header as line 1, as a spreadsheet shows them.
    """
    errors: list[RowError] = []
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing column(s) {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown column(s) {', '.join(unknown)}")
            return [], [RowError(1, "; ".join(problems))]
        seen_ids: dict[str, int] = {}
        for line, raw in enumerate(reader, start=2):
            values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
            try:
                metadata = json.loads(values["metadata"]) if values.get("metadata") else None
                if metadata is not None and not isinstance(metadata, dict):
                    raise ValueError("metadata must be a JSON object")
                state = values.get("state") or ResourceState.OPEN.value
                if state not in (ResourceState.OPEN.value, ResourceState.CLOSED.value):
                    raise ValueError("state must be OPEN or CLOSED")
                resource = ResourceCreate(
                    id=values.get("id") or None,
                    type=values["type"],
                    name=values["name"],
                    capacity=values["capacity"],
                    metadata=metadata,
                )
            except ValidationError as exc:
                for error in exc.errors():
                    field = ".".join(str(p) for p in error["loc"])
                    errors.append(RowError(line, f"{field}: {error['msg']}"))
                continue
            except (ValueError, json.JSONDecodeError) as exc:
                errors.append(RowError(line, str(exc)))
                continue
            if resource.id:
                if resource.id in seen_ids:
                    errors.append(RowError(line, f"id {resource.id} already on line {seen_ids[resource.id]}"))
                    continue
                seen_ids[resource.id] = line
            rows.append({**resource.model_dump(), "state": state})
    if not rows and not errors:
        errors.append(RowError(1, "no rows"))
    return rows, errors
