"""``/console``: the operator console's pages, their live fragments, and the actions their forms post.

Pages render whole; each live region of a page is a fragment (``/console/fragments/…``) that the page's
script fetches again when the realtime stream reports an event of a type that region shows: nothing
polls. Actions are form posts carrying the session's CSRF token; they call the same services as the
API, with the same rules (an agent acts only on the conversations it holds; resizing, closing and
reopening resources is for admins, audited with the key's id).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from dispatchd.core import events
from dispatchd.core.auth import Principal, Role, authenticate
from dispatchd.core.errors import DispatchdError, Forbidden
from dispatchd.dispatcher.models import Presence
from dispatchd.notifications import admin as notifications_admin
from dispatchd.web import views
from dispatchd.web.render import LANG_COOKIE, render
from dispatchd.web.sessions import CONSOLE_ROLES, COOKIE, SIGN_IN_COOKIE, Sessions, SignedIn, new_token, same

router = APIRouter(prefix="/console", include_in_schema=False)

PAGES = ("matching", "conversations", "reservations", "notifications", "health")
#: the pages an agent key may open
AGENT_PAGES = ("conversations",)
KEY_MAX = 200
BODY_MAX = 4096


def _services(request: Request):
    return request.app.state.services


def _sessions(request: Request) -> Sessions:
    return _services(request).domain("console").service


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def _signed_in(request: Request) -> SignedIn | None:
    return await _sessions(request).find(request.cookies.get(COOKIE))


def _home(user: SignedIn) -> str:
    return "/console/conversations" if user.principal.role is Role.AGENT else "/console/matching"


def _may_open(user: SignedIn, page: str) -> bool:
    return user.principal.is_staff or page in AGENT_PAGES


async def _require(request: Request, page: str | None = None) -> SignedIn | Response:
    user = await _signed_in(request)
    if user is None:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/console/sign-in"})
        return RedirectResponse("/console/sign-in", status_code=303)
    if page is not None and not _may_open(user, page):
        return render(request, "error.html", status=403, user=user, message="forbidden")
    return user


async def _require_post(
    request: Request, csrf_token: str | None, page: str | None = None
) -> SignedIn | Response:
    user = await _require(request, page)
    if isinstance(user, Response):
        return user
    sent = csrf_token or request.headers.get("x-csrf-token")
    if not same(sent, user.csrf_token):
        return render(request, "error.html", status=403, user=user, message="csrf")
    return user


# --------------------------------------------------------------------------------------------- sign-in


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def index(request: Request):
    user = await _signed_in(request)
    return RedirectResponse(_home(user) if user else "/console/sign-in", status_code=303)


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(request: Request):
    return _sign_in_page(request, None, 200)


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(
    request: Request, api_key: str = Form("", max_length=KEY_MAX), sign_in_token: str = Form("")
):
    if not same(sign_in_token, request.cookies.get(SIGN_IN_COOKIE)):
        return render(request, "sign_in.html", status=403, sign_in_token="", error="csrf")
    services = _services(request)
    who: Principal | None = None
    if api_key.strip():
        async with services.db.read() as session:
            who = await authenticate(session, api_key.strip())
    if who is None:
        return _sign_in_page(request, "unknown_key", 401)
    if who.role not in CONSOLE_ROLES:
        return _sign_in_page(request, "role", 403)
    token, _ = await _sessions(request).open(who)
    response = RedirectResponse(
        "/console/conversations" if who.role is Role.AGENT else "/console/matching", status_code=303
    )
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(_sessions(request).ttl_s),
        httponly=True,
        samesite="strict",
        path="/console",
        secure=_secure(request),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return response


def _sign_in_page(request: Request, error: str | None, status: int) -> Response:
    """The sign-in form, with a fresh double-submit token in the form and in a cookie."""
    token = new_token()
    response = render(request, "sign_in.html", status=status, sign_in_token=token, error=error)
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=600,
        httponly=True,
        samesite="strict",
        path="/console",
        secure=_secure(request),
    )
    return response


@router.post("/sign-out")
async def sign_out(request: Request, csrf_token: str = Form("")):
    user = await _require_post(request, csrf_token)
    if isinstance(user, Response) and user.status_code == 403:
        return user
    await _sessions(request).close(request.cookies.get(COOKIE))
    response = RedirectResponse("/console/sign-in", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


@router.get("/language/{locale}")
async def language(request: Request, locale: str, back: str = "/console"):
    response = RedirectResponse(back if back.startswith("/console") else "/console", status_code=303)
    if locale in ("fr", "en"):
        response.set_cookie(
            LANG_COOKIE,
            locale,
            max_age=31_536_000,
            samesite="strict",
            path="/console",
            secure=_secure(request),
        )
    return response


@router.get("/stream-token")
async def stream_token(request: Request):
    """A stream token for this session's key (its own topic for an agent; everything for staff)."""
    user = await _require(request)
    if isinstance(user, Response):
        return user
    realtime = _services(request).realtime
    topics = realtime.topics_for(user.principal, [])
    token, expires_at = await realtime.tokens.issue(user.principal, topics)
    return JSONResponse({"token": token, "expires_at": expires_at.isoformat()})


# --------------------------------------------------------------------------------------------- pages


@router.get("/{page}", response_class=HTMLResponse)
async def page(request: Request, page: str):
    if page not in PAGES:
        return render(request, "error.html", status=404, user=await _signed_in(request), message="not_found")
    user = await _require(request, page)
    if isinstance(user, Response):
        return user
    async with _services(request).db.read() as session:
        after = await events.last_id(session)  # read first: an event after it refreshes what follows
    context = await _fragments_context(request, user, page)
    topics = PAGE_TOPICS[page] if user.principal.is_staff else []
    return render(request, f"{page}.html", user=user, page=page, after=after, topics=topics, **context)


@router.get("/fragments/{name}", response_class=HTMLResponse)
async def fragment(
    request: Request, name: str, conversation_id: str | None = None, resource_id: str | None = None
):
    """One live region, rendered alone (what the page's script fetches after an event)."""
    page = FRAGMENT_PAGES.get(name)
    if page is None:
        return HTMLResponse("", status_code=404)
    user = await _require(request, page)
    if isinstance(user, Response):
        return user
    context = await FRAGMENTS[name](request, user, conversation_id=conversation_id, resource_id=resource_id)
    return render(request, f"fragments/{name}.html", user=user, **context)


async def _searches(request, user, **_) -> dict[str, Any]:
    return {"searches": await views.searches(_services(request))}


async def _outcomes(request, user, **_) -> dict[str, Any]:
    return {"outcomes": await views.recent_outcomes(_services(request))}


async def _today(request, user, **_) -> dict[str, Any]:
    return {"today": await views.today(_services(request))}


async def _drivers(request, user, **_) -> dict[str, Any]:
    return {"fleet": await views.drivers(_services(request))}


async def _rotation(request, user, **_) -> dict[str, Any]:
    return {"rotation": await views.rotation(_services(request))}


async def _conversations(request, user, **_) -> dict[str, Any]:
    return {"conversations": await views.conversations(_services(request), user.principal.agent_id)}


async def _thread(request, user, conversation_id: str | None = None, **_) -> dict[str, Any]:
    if not conversation_id:
        return {"thread": None}
    found = await views.thread(_services(request), conversation_id)
    conversation = found["conversation"]
    if not user.principal.is_staff and conversation.agent_id != user.principal.agent_id:
        return {"thread": None}
    agents = [a for a in await views.rotation(_services(request)) if a["presence"] == Presence.ONLINE.value]
    return {"thread": found, "transfer_to": [a for a in agents if a["id"] != conversation.agent_id]}


async def _resources(request, user, **_) -> dict[str, Any]:
    return {"resources": await views.resources(_services(request))}


async def _waiting(request, user, resource_id: str | None = None, **_) -> dict[str, Any]:
    entries = await views.waiting_list(_services(request), resource_id) if resource_id else []
    return {"resource_id": resource_id, "entries": entries}


async def _outbox(request, user, **_) -> dict[str, Any]:
    return {"outbox": await views.outbox(_services(request))}


async def _health(request, user, **_) -> dict[str, Any]:
    return {"health": await views.health(_services(request))}


async def _reports(request, user, **_) -> dict[str, Any]:
    services = _services(request)
    return {
        "by_hour": await views.by_hour(services),
        "per_driver": await views.per_driver(services),
        "today": await views.today(services),
    }


FRAGMENTS = {
    "searches": _searches,
    "outcomes": _outcomes,
    "today": _today,
    "drivers": _drivers,
    "rotation": _rotation,
    "conversations": _conversations,
    "thread": _thread,
    "resources": _resources,
    "waiting": _waiting,
    "outbox": _outbox,
    "health": _health,
    "reports": _reports,
}
FRAGMENT_PAGES = {
    "searches": "matching",
    "outcomes": "matching",
    "today": "matching",
    "drivers": "matching",
    "rotation": "conversations",
    "conversations": "conversations",
    "thread": "conversations",
    "resources": "reservations",
    "waiting": "reservations",
    "outbox": "notifications",
    "health": "health",
    "reports": "health",
}
#: what a staff page streams (an agent streams its own topic)
PAGE_TOPICS = {
    "matching": ["booking:*", "driver:*"],
    "conversations": ["conversation:*", "agent:*"],
    "reservations": ["resource:*"],
    "notifications": ["notifications", "alerts"],
    "health": ["alerts", "booking:*", "notifications", "conversation:*"],
}
PAGE_FRAGMENTS = {page: [name for name, owner in FRAGMENT_PAGES.items() if owner == page] for page in PAGES}


async def _fragments_context(request: Request, user: SignedIn, page: str) -> dict[str, Any]:
    context: dict[str, Any] = {}
    conversation_id = request.query_params.get("conversation")
    resource_id = request.query_params.get("resource")
    for name in PAGE_FRAGMENTS[page]:
        if name == "rotation" and not user.principal.is_staff:
            continue
        context.update(
            await FRAGMENTS[name](request, user, conversation_id=conversation_id, resource_id=resource_id)
        )
    context["conversation_id"] = conversation_id
    context["resource_id"] = resource_id
    return context


# --------------------------------------------------------------------------------------------- actions


async def _act(request: Request, user: SignedIn, action, back: str) -> Response:
    """Run ``action()``; a refused one shows its problem's code on the page it came from."""
    try:
        await action()
    except DispatchdError as exc:
        return render(
            request,
            "error.html",
            status=exc.status,
            user=user,
            message="refused",
            code=exc.code,
            detail=exc.detail,
            back=back,
        )
    if request.headers.get("hx-request"):
        return Response(status_code=204)
    return RedirectResponse(back, status_code=303)


@router.post("/bookings/{booking_id}/cancel")
async def cancel_booking(request: Request, booking_id: str, csrf_token: str = Form("")):
    user = await _require_post(request, csrf_token, "matching")
    if isinstance(user, Response):
        return user
    matching = _services(request).matching
    return await _act(
        request,
        user,
        lambda: matching.cancel(booking_id, f"cancelled from the console by {user.principal.key_id}"),
        "/console/matching",
    )


@router.post("/bookings/{booking_id}/restart")
async def restart_booking(request: Request, booking_id: str, csrf_token: str = Form("")):
    """A timed-out booking searched again: a new booking for the same trip (as the customer's "1")."""
    user = await _require_post(request, csrf_token, "matching")
    if isinstance(user, Response):
        return user
    services = _services(request)

    async def relaunch() -> None:
        async with services.db.transaction() as session:
            await services.matching.relaunch_in(session, booking_id)

    return await _act(request, user, relaunch, "/console/matching")


def _own(user: SignedIn, conversation) -> None:
    if not user.principal.is_staff and conversation.agent_id != user.principal.agent_id:
        raise Forbidden("an agent acts only on the conversations it holds")


@router.post("/conversations/{conversation_id}/reply")
async def reply(
    request: Request,
    conversation_id: str,
    body: str = Form("", max_length=BODY_MAX),
    csrf_token: str = Form(""),
):
    user = await _require_post(request, csrf_token, "conversations")
    if isinstance(user, Response):
        return user
    dispatcher = _services(request).dispatcher

    async def send() -> None:
        _own(user, await dispatcher.get_conversation(conversation_id))
        if not body.strip():
            raise DispatchdError("an empty reply is not sent", code="VALIDATION_ERROR")
        await dispatcher.reply(conversation_id, user.principal.agent_id, body.strip())

    return await _act(request, user, send, f"/console/conversations?conversation={conversation_id}")


@router.post("/conversations/{conversation_id}/close")
async def close_conversation(request: Request, conversation_id: str, csrf_token: str = Form("")):
    user = await _require_post(request, csrf_token, "conversations")
    if isinstance(user, Response):
        return user
    dispatcher = _services(request).dispatcher
    return await _act(
        request,
        user,
        lambda: dispatcher.close(
            conversation_id, "closed from the console", agent_id=user.principal.agent_id
        ),
        "/console/conversations",
    )


@router.post("/conversations/{conversation_id}/transfer")
async def transfer(
    request: Request,
    conversation_id: str,
    agent_id: str = Form("", max_length=40),
    csrf_token: str = Form(""),
):
    user = await _require_post(request, csrf_token, "conversations")
    if isinstance(user, Response):
        return user
    dispatcher = _services(request).dispatcher

    async def hand_on() -> None:
        _own(user, await dispatcher.get_conversation(conversation_id))
        await dispatcher.assign(
            conversation_id, agent_id, f"console {user.principal.role.value}:{user.principal.key_id}"
        )

    return await _act(request, user, hand_on, "/console/conversations")


@router.post("/resources/{resource_id}/{action}")
async def resource_action(
    request: Request,
    resource_id: str,
    action: str,
    capacity: int = Form(0, ge=0, le=1_000_000),
    csrf_token: str = Form(""),
):
    """Resize, close or reopen a resource: admin only, audited with the key, confirmed in the page."""
    user = await _require_post(request, csrf_token, "reservations")
    if isinstance(user, Response):
        return user
    reservations = _services(request).reservations
    actor = f"console:{user.principal.key_id}"

    async def run() -> None:
        user.principal.require_admin()
        if action == "resize":
            await reservations.set_capacity(resource_id, capacity, actor)
        elif action == "close":
            await reservations.close(resource_id, actor)
        elif action == "reopen":
            await reservations.reopen(resource_id, actor)
        else:
            raise DispatchdError(f"unknown action {action!r}", code="NOT_FOUND")

    return await _act(request, user, run, "/console/reservations")


@router.post("/notifications/{notification_id}/retry")
async def retry_notification(request: Request, notification_id: str, csrf_token: str = Form("")):
    user = await _require_post(request, csrf_token, "notifications")
    if isinstance(user, Response):
        return user
    db = _services(request).db
    return await _act(
        request, user, lambda: notifications_admin.retry_one(db, notification_id), "/console/notifications"
    )


@router.post("/notifications/replay")
async def replay_notifications(
    request: Request, since_hours: float = Form(1.0, gt=0, le=720), csrf_token: str = Form("")
):
    user = await _require_post(request, csrf_token, "notifications")
    if isinstance(user, Response):
        return user
    db = _services(request).db
    since = datetime.now(UTC) if db.clock is None else db.clock.now()
    return await _act(
        request,
        user,
        lambda: notifications_admin.replay(db, since - timedelta(hours=since_hours)),
        "/console/notifications",
    )
