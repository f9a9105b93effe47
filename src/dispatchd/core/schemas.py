"""Input types shared by every API: strict models and bounded UTC datetimes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


#: Free-form ``metadata`` objects: at most this many bytes once encoded as JSON (UTF-8), this deep.
METADATA_MAX_BYTES = 16_384
METADATA_MAX_DEPTH = 8

#: Deepest nesting of objects and arrays accepted in a request body (a body is at depth 1).
MAX_JSON_DEPTH = 32


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Walk a decoded JSON value iteratively (no recursion, so no ``RecursionError`` however deep) and
    return what is wrong with it, or None: a NUL character in a key or a string, or objects and arrays
    nested more than ``max_depth`` deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "text must not contain NUL (\\u0000) characters"
            if not item.isascii() and _has_lone_surrogate(item):
                return "text must be valid Unicode (no lone surrogate such as \\ud800)"
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return f"objects and arrays may be nested at most {max_depth} deep"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def _small_object(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    wrong = check_json(value, max_depth=METADATA_MAX_DEPTH)
    if wrong:
        raise ValueError(wrong)
    if len(json.dumps(value, ensure_ascii=False).encode()) > METADATA_MAX_BYTES:
        raise ValueError(f"must be at most {METADATA_MAX_BYTES // 1024} KB once encoded as JSON")
    return value


class StrictModel(BaseModel):
    """A request body: unknown fields refused, strings stripped, no NUL character anywhere (PostgreSQL
    cannot store one, and no legitimate input carries one), nested at most :data:`MAX_JSON_DEPTH` deep
    (422 VALIDATION_ERROR otherwise)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        wrong = check_json(data)
        if wrong:
            raise ValueError(wrong)
        return data


def _bounded(value: datetime) -> datetime:
    if not EARLIEST <= value <= LATEST:
        raise ValueError("must be between 1970 and 9000")
    return value.astimezone(UTC)


#: An ISO 8601 datetime with an offset (``Z`` or ``+01:00``), returned in UTC.
UtcDateTime = Annotated[AwareDatetime, AfterValidator(_bounded)]


#: A free-form JSON object (``metadata``): at most :data:`METADATA_MAX_BYTES` once encoded, nested at most
#: :data:`METADATA_MAX_DEPTH` deep, no NUL; 422 VALIDATION_ERROR otherwise.
SmallObject = Annotated[
    dict[str, Any],
    AfterValidator(_small_object),
    Field(
        description=f"A JSON object of at most {METADATA_MAX_BYTES // 1024} KB once encoded, nested at most "
        f"{METADATA_MAX_DEPTH} deep"
    ),
]
