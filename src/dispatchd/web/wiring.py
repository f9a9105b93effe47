"""The operator console as the app assembles it: its sessions and its routes under ``/console``."""

from __future__ import annotations

from dispatchd.core.wiring import Context, Domain
from dispatchd.web import router
from dispatchd.web.sessions import Sessions


def build(context: Context) -> Domain:
    return Domain(
        name="console",
        service=Sessions(context.db, ttl_s=context.settings.console_session_ttl_s),
        routers=(router.router,),
    )
