"""Provider channels against fakes: httpx.MockTransport for the HTTP APIs, a local aiosmtpd for SMTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope

from dispatchd.notifications.channels.base import ChannelError, ErrorKind, OutboundMessage, SendResult
from dispatchd.notifications.channels.smtp import SmtpChannel
from dispatchd.notifications.channels.wachap import WaChapChannel
from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel
from tests.conftest import free_port

TOKEN = "EAAGsecretTOKEN1234567890"
BASE_URL = "https://graph.example.test/v21.0"
PHONE_ID = "1098765"
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """An httpx handler answering ``response`` (or raising ``error``) and keeping every request."""

    def __init__(self, response: httpx.Response | None = None, error: Exception | None = None) -> None:
        self.response = response
        self.error = error
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response

    @property
    def json(self) -> dict:
        return json.loads(self.requests[-1].content)


def ok(wamid: str = "wamid.HBgLMjIxNzAwMDAwMDAxFQIAERgS") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "messaging_product": "whatsapp",
            "contacts": [{"input": "221700000001", "wa_id": "221700000001"}],
            "messages": [{"id": wamid}],
        },
    )


def meta_error(status: int, code: int, message: str, **headers: str) -> httpx.Response:
    body = {
        "error": {
            "message": f"(#{code}) {message}",
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": "Ax",
        }
    }
    return httpx.Response(status, json=body, headers=headers)


def cloud(handler: Handler) -> WhatsAppCloudChannel:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return WhatsAppCloudChannel(BASE_URL, PHONE_ID, TOKEN, http=http)


def outbound(**overrides) -> OutboundMessage:
    fields = {"id": "ntf-42", "recipient": "+221700000001", "category": "offer", "body": "Hello *driver*"}
    return OutboundMessage(**(fields | overrides))


async def failure(channel, message: OutboundMessage | None = None) -> ChannelError:
    with pytest.raises(ChannelError) as caught:
        await channel.send(message or outbound())
    return caught.value


# --- WhatsApp Cloud API --------------------------------------------------------------------------------


async def test_text_message_request_and_wamid() -> None:
    recorder = Recorder(ok("wamid.ABC"))
    result = await cloud(recorder).send(outbound(body="x" * 5000))

    assert result == SendResult(provider_message_id="wamid.ABC")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/{PHONE_ID}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert recorder.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "221700000001",
        "biz_opaque_callback_data": "ntf-42",
        "type": "text",
        "text": {"preview_url": False, "body": "x" * 4096},
    }


async def test_reply_buttons_request() -> None:
    recorder = Recorder(ok())
    buttons = [
        {"id": "accept:7", "title": "Accept this ride right now"},
        {"id": "decline:7", "title": "Decline"},
        {"id": "later:7", "title": "Later"},
        {"id": "extra:7", "title": "Never sent"},
    ]
    await cloud(recorder).send(outbound(body="b" * 2000, payload={"buttons": buttons}))

    assert recorder.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "221700000001",
        "biz_opaque_callback_data": "ntf-42",
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": "b" * 1024},
            "action": {
                "buttons": [
                    {"type": "reply", "reply": {"id": "accept:7", "title": "Accept this ride rig"}},
                    {"type": "reply", "reply": {"id": "decline:7", "title": "Decline"}},
                    {"type": "reply", "reply": {"id": "later:7", "title": "Later"}},
                ]
            },
        },
    }


async def test_template_request() -> None:
    recorder = Recorder(ok())
    template = {"name": "ride_offer", "language": "fr", "parameters": ["Dakar", 12]}
    await cloud(recorder).send(outbound(template=template, payload={"buttons": [{"id": "a", "title": "A"}]}))

    assert recorder.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "221700000001",
        "biz_opaque_callback_data": "ntf-42",
        "type": "template",
        "template": {
            "name": "ride_offer",
            "language": {"code": "fr"},
            "components": [
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": "Dakar"}, {"type": "text", "text": "12"}],
                }
            ],
        },
    }


async def test_template_without_parameters_has_no_components() -> None:
    recorder = Recorder(ok())
    await cloud(recorder).send(
        outbound(template={"name": "hello_world", "language": "en_US", "parameters": []})
    )
    assert recorder.json["template"] == {"name": "hello_world", "language": {"code": "en_US"}}


async def test_window_closed() -> None:
    error = await failure(cloud(Recorder(meta_error(400, 131047, "Re-engagement message"))))
    assert error.classification.kind is ErrorKind.WINDOW_CLOSED
    assert error.classification.code == "META_131047"
    assert str(error) == "Meta 131047: Re-engagement message"
    assert error.raw is not None and '"code":131047' in error.raw.replace(" ", "")


async def test_service_unavailable_is_temporary() -> None:
    error = await failure(cloud(Recorder(httpx.Response(503, text="Service Unavailable"))))
    assert error.classification.kind is ErrorKind.TEMPORARY
    assert error.classification.code == "HTTP_503"
    assert error.temporary


async def test_rate_limit_retry_after() -> None:
    error = await failure(cloud(Recorder(httpx.Response(429, headers={"Retry-After": "7"}))))
    assert error.classification.kind is ErrorKind.TEMPORARY
    assert error.retry_after_s == 7


async def test_unauthorized_alerts_and_opens_the_circuit() -> None:
    error = await failure(cloud(Recorder(httpx.Response(401, text="Unauthorized"))))
    assert error.classification.kind is ErrorKind.ALERT
    assert error.classification.opens_circuit


async def test_timeout_is_temporary() -> None:
    error = await failure(cloud(Recorder(error=httpx.ReadTimeout("timed out"))))
    assert error.classification.kind is ErrorKind.TEMPORARY
    assert error.classification.code == "TIMEOUT"


async def test_connection_error_is_temporary() -> None:
    error = await failure(cloud(Recorder(error=httpx.ConnectError("refused"))))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.TEMPORARY, "CONNECTION")


async def test_success_status_without_message_id_is_unknown() -> None:
    error = await failure(cloud(Recorder(httpx.Response(200, json={"messaging_product": "whatsapp"}))))
    assert error.classification.kind is ErrorKind.UNKNOWN


async def test_the_token_never_leaks_even_when_echoed() -> None:
    echoed = meta_error(401, 190, f"Invalid OAuth access token - Cannot parse access token: {TOKEN}")
    error = await failure(cloud(Recorder(echoed)))
    assert error.classification.kind is ErrorKind.ALERT and error.classification.opens_circuit
    assert error.classification.code == "META_190"
    assert TOKEN not in str(error) and TOKEN not in (error.raw or "") and TOKEN not in repr(error)
    assert "[REDACTED]" in str(error)

    echoed_text = httpx.Response(502, text=f"upstream said Authorization: Bearer {TOKEN} " + "z" * 3000)
    error = await failure(cloud(Recorder(echoed_text)))
    assert TOKEN not in str(error) and TOKEN not in (error.raw or "")
    assert len(error.raw or "") == 2000

    error = await failure(cloud(Recorder(error=httpx.ConnectError(f"refused {TOKEN}"))))
    assert TOKEN not in str(error) and TOKEN not in (error.raw or "")


async def test_aclose_leaves_a_client_it_does_not_own_open() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(Recorder(ok())))
    channel = WhatsAppCloudChannel(BASE_URL + "/", PHONE_ID, TOKEN, http=http)
    await channel.aclose()
    assert not http.is_closed
    owned = WhatsAppCloudChannel(BASE_URL, PHONE_ID, TOKEN)
    await owned.aclose()
    assert TOKEN not in repr(owned)


# --- WaChap ----------------------------------------------------------------------------------------------

WACHAP_URL = "https://wachap.example.test/api/send"
WACHAP_TOKEN = "wachap-secret-987654321"


def wachap(handler: Handler) -> WaChapChannel:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return WaChapChannel(WACHAP_URL, WACHAP_TOKEN, "INST-1", http=http)


async def test_wachap_request_and_success() -> None:
    recorder = Recorder(httpx.Response(200, json={"status": "success", "data": {"key": {"id": "3EB0ABC"}}}))
    result = await wachap(recorder).send(outbound(body="Bonjour"))

    assert result == SendResult(provider_message_id="3EB0ABC")
    (request,) = recorder.requests
    assert request.method == "POST" and str(request.url) == WACHAP_URL
    assert recorder.json == {
        "number": "221700000001",
        "type": "text",
        "message": "Bonjour",
        "instance_id": "INST-1",
        "access_token": WACHAP_TOKEN,
    }


@pytest.mark.parametrize(
    ("body", "provider_id"),
    [
        ({"status": "success", "id": "m1"}, "m1"),
        ({"status": "success", "message_id": "m2"}, "m2"),
        ({"status": "success", "message": "sent"}, None),
    ],
)
async def test_wachap_provider_id(body: dict, provider_id: str | None) -> None:
    result = await wachap(Recorder(httpx.Response(200, json=body))).send(outbound())
    assert result == SendResult(provider_message_id=provider_id)


async def test_wachap_error_with_http_200_is_an_alert_and_hides_the_token() -> None:
    body = {"status": "error", "message": f"Invalid access token {WACHAP_TOKEN}"}
    error = await failure(wachap(Recorder(httpx.Response(200, json=body))))
    assert error.classification.kind is ErrorKind.ALERT
    assert error.classification.code == "WACHAP_ERROR" and error.classification.opens_circuit
    assert WACHAP_TOKEN not in str(error) and WACHAP_TOKEN not in (error.raw or "")
    assert "Invalid access token" in str(error)


async def test_wachap_invalid_number_is_permanent() -> None:
    body = {"status": "error", "message": "Number not registered on WhatsApp"}
    error = await failure(wachap(Recorder(httpx.Response(200, json=body))))
    assert error.classification.kind is ErrorKind.PERMANENT


async def test_wachap_http_failure_and_timeout() -> None:
    error = await failure(wachap(Recorder(httpx.Response(502, text="Bad Gateway"))))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.TEMPORARY, "HTTP_502")
    error = await failure(wachap(Recorder(error=httpx.ReadTimeout("slow"))))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.TEMPORARY, "TIMEOUT")


# --- SMTP ------------------------------------------------------------------------------------------------


class Inbox:
    """aiosmtpd handler: keeps each envelope; refuses recipients at ``refused.example``."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: N802
        if address.endswith("@refused.example"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        self.envelopes.append(envelope)
        return "250 Message accepted"


SMTP_USER, SMTP_PASSWORD = "alerts", "p@ss/w0rd-very-secret"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    good = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=good, handled=False)  # handled=False: the server answers 535 itself


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, authenticator=authenticator, auth_require_tls=False
    )
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def parsed(inbox: Inbox) -> EmailMessage:
    (envelope,) = inbox.envelopes
    return message_from_bytes(envelope.original_content, policy=policy.default)  # unfolds headers


async def test_smtp_delivers_one_message(smtp_server) -> None:
    inbox, port = smtp_server
    channel = SmtpChannel(f"smtp://127.0.0.1:{port}", "dispatchd@example.test")
    first_line = "*Booking 42 unassigned* after five minutes of searching for a driver in the city of Dakar"
    body = f"{first_line}\nDetails"
    result = await channel.send(outbound(recipient="ops@example.test", body=body))

    email = parsed(inbox)
    assert inbox.envelopes[0].mail_from == "dispatchd@example.test"
    assert inbox.envelopes[0].rcpt_tos == ["ops@example.test"]
    assert email["To"] == "ops@example.test"
    assert email["Subject"] == first_line.replace("*", "")[:78]
    assert len(email["Subject"]) == 78
    assert email.get_content().replace("\r\n", "\n").strip() == body  # SMTP carries CRLF line ends
    assert result.provider_message_id == email["Message-ID"]


async def test_smtp_with_credentials(smtp_server) -> None:
    inbox, port = smtp_server
    channel = SmtpChannel(f"smtp://{SMTP_USER}:p%40ss%2Fw0rd-very-secret@127.0.0.1:{port}", "d@example.test")
    await channel.send(outbound(recipient="ops@example.test", body="Hello"))
    assert parsed(inbox)["Subject"] == "Hello"


async def test_smtp_wrong_password_alerts_without_showing_it(smtp_server) -> None:
    _, port = smtp_server
    channel = SmtpChannel(f"smtp://{SMTP_USER}:wrong-secret-pw@127.0.0.1:{port}", "d@example.test")
    error = await failure(channel, outbound(recipient="ops@example.test"))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.ALERT, "SMTP_AUTH")
    assert error.classification.opens_circuit
    assert "wrong-secret-pw" not in str(error) and "wrong-secret-pw" not in (error.raw or "")
    assert "wrong-secret-pw" not in repr(channel)


async def test_smtp_refused_recipient_is_permanent(smtp_server) -> None:
    _, port = smtp_server
    channel = SmtpChannel(f"smtp://127.0.0.1:{port}", "d@example.test")
    error = await failure(channel, outbound(recipient="nobody@refused.example"))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.PERMANENT, "SMTP_RECIPIENT")


async def test_smtp_refused_connection_is_temporary() -> None:
    channel = SmtpChannel(f"smtp://u:{SMTP_PASSWORD}@127.0.0.1:{free_port()}", "d@example.test", timeout_s=2)
    error = await failure(channel, outbound(recipient="ops@example.test"))
    assert (error.classification.kind, error.classification.code) == (ErrorKind.TEMPORARY, "SMTP_CONNECTION")
    assert SMTP_PASSWORD not in str(error)


@pytest.mark.parametrize(
    ("url", "host", "port", "use_tls", "start_tls"),
    [
        ("smtps://u:p@mail.example.test", "mail.example.test", 465, True, False),
        ("smtps://u:p@mail.example.test:2465", "mail.example.test", 2465, True, False),
        ("smtp://u:p@mail.example.test:587", "mail.example.test", 587, False, True),
        ("smtp://mail.example.test", "mail.example.test", 25, False, None),
    ],
)
def test_smtp_url(url: str, host: str, port: int, use_tls: bool, start_tls: bool | None) -> None:
    channel = SmtpChannel(url, "d@example.test")
    assert (channel._host, channel._port, channel._use_tls, channel._start_tls) == (
        host,
        port,
        use_tls,
        start_tls,
    )


@pytest.mark.parametrize("url", ["http://mail.example.test", "smtp://", "smtp://host:notaport"])
def test_smtp_bad_url(url: str) -> None:
    with pytest.raises(ValueError):
        SmtpChannel(url, "d@example.test")
