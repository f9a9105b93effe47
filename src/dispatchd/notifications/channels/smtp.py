"""The ``smtp`` channel: plain-text email (admin alerts) through one SMTP server, with aiosmtplib.

``smtp_url`` is ``smtp[s]://[user:password@]host[:port]`` (user and password percent-encoded):
``smtps`` connects with implicit TLS (default port 465); ``smtp`` on port 587 upgrades with STARTTLS,
on other ports (default 25) it upgrades only when the server offers STARTTLS (aiosmtplib's default).
The subject is the body's first line without markdown asterisks (≤ 78 characters, RFC 5322 §2.1.1);
the body is the text, with the files of ``payload["attachments"]`` attached (each ``{"filename",
"content_type", "content"}``, ``content`` text sent as UTF-8, e.g. the admins' CSV reports). Failures
are classified by :func:`dispatchd.notifications.classify.classify_smtp`; the password never appears in
an error.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import unquote, urlsplit

import aiosmtplib

from dispatchd.notifications.channels.base import ChannelError, OutboundMessage, SendResult
from dispatchd.notifications.classify import classify_smtp

SUBJECT_MAX = 78
RAW_MAX = 2000
REDACTED = "[REDACTED]"
DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
SUBMISSION_PORT = 587


class SmtpChannel:
    """Sends one email per call, opening one SMTP connection each time; ``timeout_s`` (seconds) bounds
    each network operation."""

    name = "smtp"

    def __init__(self, smtp_url: str, sender: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(smtp_url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError("smtp_url must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("smtp_url has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("smtp_url has an invalid port") from None
        self._host = parts.hostname
        self._port = port or DEFAULT_PORTS[scheme]
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._use_tls = scheme == "smtps"
        self._start_tls: bool | None = None  # None: aiosmtplib upgrades when the server offers STARTTLS
        if self._use_tls:
            self._start_tls = False
        elif self._port == SUBMISSION_PORT:
            self._start_tls = True
        self._secrets = [s for s in {self._password, parts.password} if s]
        self._sender = sender
        self._timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"SmtpChannel(host={self._host!r}, port={self._port}, tls={self._use_tls})"

    async def aclose(self) -> None:
        """Nothing to release: each send opens and closes its own connection."""

    async def send(self, message: OutboundMessage) -> SendResult:
        """Email ``message.body`` to ``message.recipient``; return the ``Message-ID`` or raise
        :class:`ChannelError` (classified)."""
        email = build_email(message, self._sender)
        try:
            await aiosmtplib.send(
                email,
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password,
                use_tls=self._use_tls,
                start_tls=self._start_tls,
                timeout=self._timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            detail = self._scrub(f"SMTP {self._host}:{self._port} failed: {type(exc).__name__}: {exc}")
            raise ChannelError(detail[:RAW_MAX], classify_smtp(exc), raw=detail[:RAW_MAX]) from None
        return SendResult(provider_message_id=email["Message-ID"])

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def subject_of(body: str, fallback: str = "dispatchd notification") -> str:
    """First non-empty line of ``body`` without ``*``, whitespace-collapsed, at most 78 characters."""
    for line in body.splitlines():
        line = " ".join(line.replace("*", "").split())
        if line:
            return line[:SUBJECT_MAX]
    return fallback


def build_email(message: OutboundMessage, sender: str) -> EmailMessage:
    email = EmailMessage()
    email["From"] = sender
    email["To"] = message.recipient
    email["Subject"] = subject_of(message.body, f"dispatchd: {message.category}")
    email["Date"] = formatdate(localtime=False, usegmt=True)
    # an explicit domain: without one make_msgid asks DNS for this host's FQDN
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else "localhost"
    email["Message-ID"] = make_msgid(idstring=message.id.replace("@", "_")[:64] or None, domain=domain)
    email.set_content(message.body)
    for attachment in (message.payload or {}).get("attachments") or ():
        maintype, _, subtype = str(attachment.get("content_type") or "text/plain").partition("/")
        email.add_attachment(
            str(attachment["content"]).encode("utf-8"),
            maintype=maintype,
            subtype=subtype or "plain",
            filename=str(attachment["filename"]),
        )
    return email
