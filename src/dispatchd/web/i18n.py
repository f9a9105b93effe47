"""The console's languages: which one a request gets, its translations, one Jinja2 environment each.

Messages are written in English in the templates (``{{ _("Sign in") }}``, ``{% trans %}``) and in
Python (``_()``/``ngettext``); ``make i18n`` extracts them into ``locales/messages.pot``, merges them
into ``locales/<locale>/LC_MESSAGES/messages.po`` and compiles the ``.mo`` files read here. In
Python, translate with ``translations(locale).gettext("Sign in")`` or ``.ngettext(...)`` (both are
extraction keywords); a message defined before its locale is known is marked ``N_("...")``.

A route::

    locale = i18n.negotiate(request.headers.get("accept-language"), request.cookies.get("lang"))
    template = i18n.environment(locale).get_template("bookings.html")
    return HTMLResponse(template.render(bookings=rows), headers={"Content-Language": locale})
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from babel.core import negotiate_locale
from babel.dates import format_datetime as babel_format_datetime
from babel.dates import format_timedelta as babel_format_timedelta
from babel.numbers import format_decimal as babel_format_decimal
from babel.numbers import format_percent as babel_format_percent
from babel.support import Translations

#: the console's languages, the default first (the seeds' users write French)
LOCALES: tuple[str, ...] = ("fr", "en")
DEFAULT_LOCALE = "fr"

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = WEB_DIR / "templates"
LOCALES_DIR = WEB_DIR / "locales"
DOMAIN = "messages"

#: an Accept-Language header is read up to this many characters and this many entries
MAX_HEADER_CHARS = 200
MAX_HEADER_ENTRIES = 20

# RFC 9110 language-range: "*" or alpha{1,8} *("-" alphanum{1,8}); "_" is tolerated as a separator
_LANGUAGE_RANGE = re.compile(r"^(?:\*|[A-Za-z]{1,8}(?:[-_][A-Za-z0-9]{1,8})*)$")
_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")


def parse_accept_language(header: str | None) -> list[str]:
    """The language ranges of an Accept-Language header, most preferred first.

    Entries with ``q=0``, malformed tags or malformed q-values are skipped; equal q-values keep the
    header's order. Only the first ``MAX_HEADER_CHARS`` characters and ``MAX_HEADER_ENTRIES`` entries
    are read (an entry cut by the character bound is dropped).
    """
    if not header:
        return []
    text = header[: MAX_HEADER_CHARS + 1]
    if len(text) > MAX_HEADER_CHARS:
        text = text[:MAX_HEADER_CHARS]
        text = text[: text.rfind(",")] if "," in text else ""
    ranked: list[tuple[float, int, str]] = []
    for index, entry in enumerate(text.split(",")[:MAX_HEADER_ENTRIES]):
        tag, *params = (part.strip() for part in entry.split(";"))
        if not _LANGUAGE_RANGE.match(tag):
            continue
        q = 1.0
        for param in params:
            name, sep, value = param.partition("=")
            if name.strip().lower() != "q":
                continue
            value = value.strip()
            if not sep or not _QVALUE.match(value):
                q = -1.0
            else:
                q = float(value)
            break
        if q > 0:
            ranked.append((-q, index, tag))
    ranked.sort()
    return [tag for _, _, tag in ranked]


def _supported(tag: str) -> str | None:
    """The supported locale for one language tag ("fr-SN" → "fr"), or None."""
    found = negotiate_locale([tag.replace("_", "-")], LOCALES, sep="-", aliases={})
    return found.lower() if found else None


def negotiate(accept_language: str | None, chosen: str | None) -> str:
    """The locale of a request: an explicit supported choice (cookie or query), else the best
    supported language of the Accept-Language header, else ``DEFAULT_LOCALE``."""
    if chosen:
        chosen = chosen.strip()
        if len(chosen) <= 35 and _LANGUAGE_RANGE.match(chosen) and chosen != "*":
            found = _supported(chosen)
            if found:
                return found
    for tag in parse_accept_language(accept_language):
        if tag == "*":
            return DEFAULT_LOCALE
        found = _supported(tag)
        if found:
            return found
    return DEFAULT_LOCALE


def _check(locale: str) -> str:
    if locale not in LOCALES:
        raise ValueError(f"unsupported locale {locale!r}; the console speaks {', '.join(LOCALES)}")
    return locale


@cache
def translations(locale: str) -> Translations:
    """The compiled catalogue ``locales/<locale>/LC_MESSAGES/messages.mo``, read once.

    A missing ``.mo`` is an error rather than a silent fall back to English: run ``make i18n``.
    """
    path = LOCALES_DIR / _check(locale) / "LC_MESSAGES" / f"{DOMAIN}.mo"
    with path.open("rb") as fp:
        return Translations(fp, domain=DOMAIN)


# ------------------------------------------------------------------------------------------ filters


def _zone(tz: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _as_datetime(value: datetime | float | int | str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, (int, float)):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        moment = datetime.fromisoformat(value)
    # naive datetimes are UTC, as everywhere in dispatchd
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def make_filters(locale: str) -> dict[str, object]:
    """The Babel-based filters of ``locale``'s environment (each renders ``None`` as "")."""

    def format_datetime(
        value: datetime | float | int | str | None, format: str = "short", tz: str | None = "UTC"
    ) -> str:
        """A moment in the IANA time zone ``tz`` ("Africa/Dakar"): ``format`` is short, medium,
        long, full or a CLDR pattern."""
        if value is None or value == "":
            return ""
        return babel_format_datetime(_as_datetime(value), format, tzinfo=_zone(tz), locale=locale)

    def format_number(value: float | int | None, format: str | None = None) -> str:
        """A number with the locale's separators ("12 345,6"); ``format`` is an optional CLDR pattern."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return babel_format_decimal(value, format=format, locale=locale)

    def format_percent(value: float | int | None, format: str | None = None) -> str:
        """A ratio as a percentage: 0.25 → "25 %" in French, "25%" in English."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return babel_format_percent(value, format=format, locale=locale)

    def format_timedelta(
        value: timedelta | float | int | None,
        granularity: str = "second",
        threshold: float = 0.85,
        format: str = "short",
        add_direction: bool = False,
    ) -> str:
        """A duration (a timedelta or seconds), rounded to its largest unit: "3 min", "2 h"."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return babel_format_timedelta(
            value,
            granularity=granularity,
            threshold=threshold,
            format=format,
            add_direction=add_direction,
            locale=locale,
        )

    return {
        "format_datetime": format_datetime,
        "format_number": format_number,
        "format_percent": format_percent,
        "format_timedelta": format_timedelta,
    }


@cache
def environment(locale: str) -> jinja2.Environment:
    """The Jinja2 environment of ``locale``: templates from ``web/templates``, HTML autoescaped,
    ``_``/``gettext``/``ngettext`` (new style: ``_("%(count)s drivers", count=n)``) and the filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(("html", "htm", "xml"), default_for_string=True),
        extensions=["jinja2.ext.i18n"],
    )
    # {% trans %} blocks are whitespace-trimmed, as babel.cfg extracts them (trimmed = true)
    env.policies["ext.i18n.trimmed"] = True
    env.install_gettext_translations(translations(_check(locale)), newstyle=True)
    env.filters.update(make_filters(locale))
    env.globals["locale"] = locale
    env.globals["locales"] = LOCALES
    return env
