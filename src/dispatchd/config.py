"""Settings, read from the environment with the prefix ``DISPATCHD_`` (and an optional ``.env`` file).

Invalid values stop start-up with a message naming the setting (see :func:`load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE_PATH = Path("var/dispatchd.db")


class SettingsError(Exception):
    """Raised when a setting is invalid; the message names every offending ``DISPATCHD_*`` variable."""


class Settings(BaseSettings):
    """dispatchd settings. Durations are seconds, distances km."""

    model_config = SettingsConfigDict(env_prefix="DISPATCHD_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite+aiosqlite:///{DEFAULT_SQLITE_PATH}",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db",
    )
    admin_api_key: str | None = Field(
        default=None,
        min_length=16,
        description="Bootstrap admin key; when unset at first start one is generated and printed once",
    )
    auth_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a verified API key is remembered (a revoke in another process waits this long)",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="`dispatchd serve` processes sharing the port (uvicorn's supervisor); more than 1 needs "
        "PostgreSQL",
    )
    serve_delivery: bool = Field(
        default=True,
        description="`dispatchd serve` runs the outbox delivery loop; false leaves it to `dispatchd worker` "
        "(PostgreSQL)",
    )
    worker_processes: int = Field(
        default=1, ge=1, le=256, description="`dispatchd worker` processes (PostgreSQL only)"
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=1_073_741_824,
        description="Largest request body in bytes (1 MiB); larger ones get 413 before authentication",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A connection that has not sent a request's headers within this many seconds is closed "
        "(slowloris, silent sockets)",
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, le=3600, description="An idle keep-alive connection is closed after this (s)"
    )
    limit_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="At most this many connections and requests at once; beyond, new requests get 503 "
        "(unset: no limit, the file-descriptor limit and the header timeout bound them)",
    )
    webhook_max_body_bytes: int = Field(
        default=3_145_728,
        ge=1024,
        le=1_073_741_824,
        description="Largest WhatsApp webhook delivery in bytes (3 MiB; Meta's are a few KB)",
    )

    offer_timeout_s: float = Field(default=30.0, gt=0, description="Life of one driver offer (seed 000 §4)")
    search_timeout_s: float = Field(default=300.0, gt=0, description="Life of a whole search (seed 000 §4)")
    wave_retry_s: float = Field(
        default=10.0, gt=0, description="Pause before looking again for drivers when a wave found nobody"
    )
    escalation_radius_factor: float = Field(
        default=1.5, ge=1.0, description="Each new wave multiplies max_distance_km by this"
    )
    driver_stale_after_s: float = Field(
        default=900.0,
        ge=0,
        description="Drivers silent (no heartbeat) longer than this get no offer; 0 = never",
    )
    # matching's progress messages, zones and reports (seed 000 §6, §7.1; issue 14)
    search_progress_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="At most one 'search widened' message to a customer per this many seconds (seed 000 "
        "§7.1 notifySearchProgress); 0 = one per wave",
    )
    zone_geohash_precision: int = Field(
        default=5, ge=1, le=12, description="Geohash length of a zone cell (5 ≈ 4.9 km × 4.9 km)"
    )
    zones_geojson: str | None = Field(
        default=None,
        description="GeoJSON file of named zones (Polygon/MultiPolygon features, properties.name); a "
        "pickup outside every polygon falls in its geohash cell",
    )
    report_daily_schedule: str | None = Field(
        default=None,
        description="Cron, in DISPATCHD_TIMEZONE, of the daily matching report to the admins (seed 000 "
        "§5.1 sendDailyMetricsReport), e.g. '0 7 * * *'; unset = never",
    )
    report_weekly_schedule: str | None = Field(
        default=None,
        description="Cron, in DISPATCHD_TIMEZONE, of the weekly matching report (the 7 days before), e.g. "
        "'0 7 * * 1'; unset = never",
    )

    sweep_interval_s: float = Field(default=0.5, gt=0, le=60, description="Deadline sweeper period")
    sweep_batch_size: int = Field(default=500, ge=1, le=10_000)
    sweeper_lag_warning_s: float = Field(default=5.0, gt=0)
    sweeper_lag_critical_s: float = Field(default=30.0, gt=0)
    inbound_route_inline: bool = Field(
        default=True,
        description=(
            "Route a new inbound WhatsApp message before answering the webhook (lowest latency); "
            "false leaves it to the sweeper's next tick (shortest answer to Meta)"
        ),
    )

    notification_channel: str = Field(
        default="log", description="Outbound channel for phones: log | whatsapp_cloud | wachap"
    )
    whatsapp_api_base_url: str = Field(
        default="https://graph.facebook.com/v21.0", description="Meta Graph API base, version pinned"
    )
    whatsapp_access_token: SecretStr | None = None
    whatsapp_phone_number_id: str | None = None
    whatsapp_app_secret: SecretStr | None = Field(default=None, description="Checks X-Hub-Signature-256")
    whatsapp_verify_token: SecretStr | None = Field(
        default=None, description="Webhook verification handshake"
    )
    whatsapp_templates: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='JSON: category -> {"name", "language"}; used when the 24 h window is closed (131047)',
    )
    wachap_api_url: str | None = None
    wachap_access_token: SecretStr | None = None
    wachap_instance_id: str | None = None
    smtp_url: SecretStr | None = Field(
        default=None, description="smtp[s]://user:password@host:port for alerts"
    )
    smtp_sender: str = "dispatchd@localhost"
    admin_emails: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated addresses receiving admin alerts by email"
    )
    whatsapp_http2: Literal["off", "alpn", "prior_knowledge"] = Field(
        default="off",
        description="HTTP/2 to the WhatsApp Cloud API: off = HTTP/1.1 keep-alive; alpn = when TLS negotiates "
        "it (https); prior_knowledge = also over cleartext http:// (h2c). HTTP/2 costs the sender less CPU, "
        "but a server's GOAWAY fails the sends racing it (docs/benchmarks.md, issue 11)",
    )
    delivery_batch_size: int = Field(default=200, ge=1, le=10_000)
    delivery_concurrency: int = Field(default=32, ge=1, le=1000, description="Messages in flight at once")
    channel_rate: str = Field(default="80/second", description="Bounded drain rate of the phone channel")
    recipient_interval_s: float = Field(
        default=6.0, ge=0, description="At most one message per phone per this many seconds (Meta pacing)"
    )
    notification_latency_alert_s: float = Field(
        default=60.0,
        gt=0,
        description="Admins are alerted when a customer or admin message waits longer than this unsent",
    )
    delivery_lease_s: float = Field(
        default=60.0, gt=0, description="A claimed notification returns after this"
    )
    admin_phones: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated E.164 numbers that receive admin alerts"
    )

    # --- Admin alerts (seed 004 §5 "Système d'Alertes Admin", seed 000 AdminAlertService) -------------
    # The 60 s monitor of dispatchd.notifications.alerts; every rule's threshold, cooldown and severity.
    alerts_enabled: bool = Field(
        default=True, description="Run the alert monitor in the server (seed's ALERT_SYSTEM_ENABLED)"
    )
    alert_email_enabled: bool = Field(
        default=True, description="Send alerts to DISPATCHD_ADMIN_EMAILS (seed's ALERT_EMAIL_ENABLED)"
    )
    alert_whatsapp_enabled: bool = Field(
        default=True,
        description="Send critical alerts to DISPATCHD_ADMIN_PHONES (seed's ALERT_WHATSAPP_ENABLED)",
    )
    alert_interval_s: float = Field(
        default=60.0, gt=0, le=3600, description="Alert rules evaluated this often"
    )
    alert_cooldown_s: float = Field(
        default=3600.0, ge=0, description="A rule fires at most once per this many seconds"
    )
    alert_failures_per_hour: int = Field(
        default=20, ge=1, description="FAILURES_1H: failed send attempts in the last hour"
    )
    alert_permanent_per_day: int = Field(
        default=5, ge=1, description="PERMANENT_24H: permanent failures in the last 24 h"
    )
    alert_failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="FAILURE_RATE_1H: failed / (failed + sent) attempts, last hour"
    )
    alert_min_outcomes: int = Field(
        default=10, ge=1, description="FAILURE_RATE_1H needs at least this many attempts in the hour"
    )
    alert_severities: dict[str, str] = Field(
        default_factory=dict,
        description='JSON: rule -> "critical" | "warning" | "off", overriding a rule\'s default severity '
        '(critical: WhatsApp and email; warning: email only; off: never evaluated), e.g. {"PERMANENT_24H": '
        '"critical"}; a rule with a suffix (CIRCUIT_OPEN:whatsapp_cloud) is matched by its prefix too',
    )
    low_drivers_threshold: int = Field(
        default=3,
        ge=0,
        description="LOW_DRIVER_AVAILABILITY: fewer available drivers than this while searches run (0 = off)",
    )
    timeout_rate_alert: float = Field(
        default=0.5, gt=0, le=1, description="SEARCH_TIMEOUT_RATE: share of last hour's searches timed out"
    )
    timeout_rate_min_searches: int = Field(
        default=5, ge=1, description="SEARCH_TIMEOUT_RATE needs at least this many finished searches"
    )
    # --------------------------------------------------------------------------------------------------

    waiting_list_hold_s: float = Field(
        default=900.0, gt=0, description="How long a freed place is held for the waiting list's head"
    )
    reservation_batch_max: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Group commit: most reserve requests for one resource admitted by one transaction "
        "(those that queued behind the commit in flight); 1 commits each request alone",
    )
    availability_cache_s: float = Field(
        default=2.0,
        ge=0,
        description="Availability views are cached this long (invalidated by local commits)",
    )
    rate_limit: str = Field(
        default="100/second;3000/minute", description="Per API key on the reservation routes (limits syntax)"
    )
    rate_limit_storage: str = Field(
        default="memory://", description="memory:// (per process) or redis://host:6379"
    )

    agent_presence_timeout_s: float = Field(
        default=90.0, gt=0, description="An agent without a heartbeat this long is disconnected (seed 001)"
    )
    agent_reply_timeout_s: float = Field(
        default=600.0,
        ge=0,
        description="A conversation whose customer waits this long for its agent's reply moves on (0 = off)",
    )
    conversation_idle_close_s: float = Field(
        default=86_400.0,
        gt=0,
        description="A conversation with no message this long closes (WhatsApp's 24 h window)",
    )
    pending_alert_s: float = Field(
        default=600.0, gt=0, description="Admins are alerted when a conversation waits for an agent this long"
    )
    dispatch_schedule: str | None = Field(
        default=None,
        description="Cron expression of the scheduled distribution of pending conversations (seed 001 §6.4), "
        "in DISPATCHD_TIMEZONE, e.g. '0 8 * * 1-5'",
    )
    timezone: str = Field(default="UTC", description="The business's IANA time zone, e.g. Africa/Dakar")
    pending_notice: str = Field(
        default="Merci pour votre message : un conseiller vous répond dès que possible.",
        max_length=1000,
        description="Sent once per conversation to a customer whose message no agent can take yet",
    )

    stream_ping_s: float = Field(
        default=15.0, gt=0, le=300, description="Seconds between comment pings on an idle SSE stream"
    )
    stream_retry_ms: int = Field(
        default=2000, ge=100, le=600_000, description="The SSE retry: hint, ms a client waits to reconnect"
    )
    stream_queue_max: int = Field(
        default=1000,
        ge=10,
        le=1_000_000,
        description="Events buffered for one slow stream before it is closed (it resumes with Last-Event-ID)",
    )
    stream_max_per_key: int = Field(
        default=100, ge=1, le=1_000_000, description="Open streams (SSE, WebSocket) per API key, per process"
    )
    stream_token_ttl_s: float = Field(
        default=60.0, gt=0, le=3600, description="Seconds a stream token may be used to connect"
    )
    stream_token_secret: str | None = Field(
        default=None,
        min_length=32,
        description="Signs stream tokens; by default a random secret kept in the database, shared by "
        "every instance",
    )
    stream_fallback_read_s: float = Field(
        default=1.0, gt=0, le=60, description="The hub reads the event log at least this often"
    )
    stream_redis_url: str | None = Field(
        default=None,
        description="redis://host:6379/0 to wake other instances' hubs by Redis pub/sub as well as "
        "PostgreSQL LISTEN/NOTIFY",
    )
    console_session_ttl_s: float = Field(
        default=43_200.0,
        gt=0,
        le=2_592_000,
        description="A console session lasts this long after sign-in (s)",
    )
    agent_disconnect_grace_s: float = Field(
        default=20.0,
        gt=0,
        description="An agent whose last WebSocket closed is disconnected after this long unless it "
        "reconnects",
    )

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("admin_phones", "admin_emails", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("alert_severities")
    @classmethod
    def _severities(cls, value: dict[str, str]) -> dict[str, str]:
        normalised = {rule.strip().upper(): str(level).strip().lower() for rule, level in value.items()}
        levels = ("critical", "warning", "off")
        bad = sorted(rule for rule, level in normalised.items() if level not in levels)
        if bad:
            raise ValueError(f"severity must be critical, warning or off (rules {', '.join(bad)})")
        return normalised

    @field_validator("admin_phones")
    @classmethod
    def _e164(cls, value: list[str]) -> list[str]:
        from dispatchd.core.phone import is_e164

        bad = [phone for phone in value if not is_e164(phone)]
        if bad:
            raise ValueError(f"not E.164 phone numbers: {', '.join(bad)}")
        return value

    @field_validator("dispatch_schedule", "report_daily_schedule", "report_weekly_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and value.strip() and not croniter.is_valid(value):
            raise ValueError("must be a cron expression (minute hour day month weekday)")
        return value.strip() or None if value is not None else None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone such as Africa/Dakar") from None
        return value

    @field_validator("notification_channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        if value not in {"log", "whatsapp_cloud", "wachap"}:
            raise ValueError("must be one of: log, whatsapp_cloud, wachap")
        return value

    @model_validator(mode="after")
    def _channel_credentials(self) -> Settings:
        needed = {
            "whatsapp_cloud": ("whatsapp_access_token", "whatsapp_phone_number_id"),
            "wachap": ("wachap_api_url", "wachap_access_token", "wachap_instance_id"),
        }.get(self.notification_channel, ())
        missing = [f"DISPATCHD_{name.upper()}" for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"channel {self.notification_channel} needs {', '.join(missing)}")
        if self.admin_emails and not self.smtp_url:
            raise ValueError("DISPATCHD_ADMIN_EMAILS needs DISPATCHD_SMTP_URL")
        return self

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many

        if value:
            try:
                parse_many(value)
            except ValueError:
                raise ValueError("must look like '100/second;3000/minute' (or be empty: no limit)") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Read the settings; raise :class:`SettingsError` naming each invalid ``DISPATCHD_*`` variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if error["loc"]:
                name = "_".join(str(part) for part in error["loc"]).upper()
                lines.append(f"DISPATCHD_{name}: {error['msg']}")
            else:  # a rule across settings: its message names them
                lines.append(error["msg"].removeprefix("Value error, "))
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
