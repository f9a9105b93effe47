"""CSV import of resources and export of reservations (seed 003 §4.4).

Import columns (header required): ``type,name,capacity`` and optionally ``id``, ``state`` (OPEN/CLOSED),
``metadata`` (a JSON object). Every row is validated first; any error stops the import with its line
number, and nothing is written (one transaction for the whole file).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from dispatchd.reservations.models import Reservation, ResourceState
from dispatchd.reservations.schemas import ResourceCreate

EXPORT_COLUMNS = ["id", "resource_id", "client_id", "quantity", "status", "created_at", "cancelled_at"]
REQUIRED = ("type", "name", "capacity")
OPTIONAL = ("id", "state", "metadata")

#: Limits of an import file: rows (besides the header), characters per line and per field.
MAX_ROWS = 100_000
MAX_LINE_CHARS = 65_536
MAX_FIELD_CHARS = 32_768


#: What a spreadsheet reads as the start of a formula (OWASP "CSV Injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """A text cell made inert for spreadsheets, as OWASP's CSV Injection page advises: a cell starting
    with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading single quote (``+221…`` is
    exported ``'+221…``; strip one leading ``'`` to read the value back)."""
    return f"'{cell}" if cell.startswith(FORMULA_TRIGGERS) else cell


def reservation_row(reservation: Reservation) -> list[Any]:
    """One export line, in :data:`EXPORT_COLUMNS` order (times ISO 8601 UTC), text cells neutralised
    against formula injection (:func:`neutralise`)."""
    return [
        neutralise(reservation.id),
        neutralise(reservation.resource_id),
        neutralise(reservation.client_id),
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


class FileTooLarge(ValueError):
    """The file exceeds :data:`MAX_ROWS` rows or :data:`MAX_LINE_CHARS` characters on a line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _bounded_lines(handle: TextIO) -> Iterator[str]:
    """The file's lines, read one at a time and never more than :data:`MAX_LINE_CHARS` characters at once
    (``/dev/zero`` or a file without newlines is refused, not read whole); at most :data:`MAX_ROWS` + 1
    lines. Raises :class:`FileTooLarge`."""
    for number in itertools.count(1):
        line = handle.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS:
            raise FileTooLarge(number, f"line longer than {MAX_LINE_CHARS} characters")
        if number > MAX_ROWS + 1:
            raise FileTooLarge(number, f"more than {MAX_ROWS} rows; split the file")
        yield line


def parse_resources(path: Path) -> tuple[list[dict[str, Any]], list[RowError]]:
    """Read and validate every row; return ``(rows ready for import, errors)`` — import only if no error.

    Line numbers count the header as line 1, as a spreadsheet shows them. The file is streamed: at most
    :data:`MAX_ROWS` rows, :data:`MAX_LINE_CHARS` characters a line and :data:`MAX_FIELD_CHARS` a field,
    or a single error saying which limit (the file is not read further).
    """
    errors: list[RowError] = []
    rows: list[dict[str, Any]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            _read_rows(csv.DictReader(_bounded_lines(handle)), rows, errors)
    except FileTooLarge as exc:
        return [], [RowError(exc.line, str(exc))]
    except csv.Error as exc:  # a quoted field spanning lines beyond the field limit
        return [], [RowError(0, f"unreadable CSV: {exc}")]
    except UnicodeDecodeError:
        return [], [RowError(0, "not UTF-8 text")]
    if not rows and not errors:
        errors.append(RowError(1, "no rows"))
    return rows, errors


def _read_rows(reader: csv.DictReader, rows: list[dict[str, Any]], errors: list[RowError]) -> None:
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        errors.append(RowError(1, "; ".join(problems)))
        return
    seen_ids: dict[str, int] = {}
    for line, raw in enumerate(reader, start=2):
        values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if any(len(value) > MAX_FIELD_CHARS for value in values.values()):
            errors.append(RowError(line, f"a field longer than {MAX_FIELD_CHARS} characters"))
            continue
        try:
            metadata = json.loads(values["metadata"]) if values.get("metadata") else None
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError("metadata must be a JSON object")
            state = values.get("state") or ResourceState.OPEN.value
            if state not in (ResourceState.OPEN.value, ResourceState.CLOSED.value):
                raise ValueError("state must be OPEN or CLOSED")
            try:
                capacity = int(values["capacity"])
            except ValueError:
                raise ValueError(f"capacity: {values['capacity']!r} is not a whole number") from None
            resource = ResourceCreate(
                id=values.get("id") or None,
                type=values["type"],
                name=values["name"],
                capacity=capacity,
                metadata=metadata,
            )
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"])
                errors.append(RowError(line, f"{field}: {error['msg']}"))
            continue
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            errors.append(RowError(line, str(exc)))
            continue
        if resource.id:
            if resource.id in seen_ids:
                errors.append(RowError(line, f"id {resource.id} already on line {seen_ids[resource.id]}"))
                continue
            seen_ids[resource.id] = line
        rows.append({**resource.model_dump(), "state": state})
