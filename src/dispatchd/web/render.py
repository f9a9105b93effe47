"""Rendering a console template in the reader's language (``Accept-Language``, or the language chosen
with the switch, kept in a cookie), with the security headers of an HTML page."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse

from dispatchd.web.i18n import environment, negotiate

LANG_COOKIE = "dispatchd_lang"

#: scripts and styles only from this origin: no inline script, no CDN (the console works offline)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def locale_of(request: Request) -> str:
    return negotiate(request.headers.get("accept-language"), request.cookies.get(LANG_COOKIE))


def render(request: Request, name: str, *, status: int = 200, **context) -> HTMLResponse:
    """``name`` rendered with ``context`` plus ``request``, ``tz`` (``DISPATCHD_TIMEZONE``) and ``now``."""
    locale = locale_of(request)
    services = request.app.state.services
    html = (
        environment(locale)
        .get_template(name)
        .render(request=request, tz=services.settings.timezone, now=services.db.clock.now(), **context)
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            "Content-Language": locale,
            "Vary": "Accept-Language, Cookie",  # the language follows the header or the switch's cookie
            "Cache-Control": "no-store",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        },
    )
