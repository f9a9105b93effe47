"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("driver_id", sa.String(length=40), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_table(
        "drivers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=False),
        sa.Column("vehicle_type", sa.String(length=60), nullable=False),
        sa.Column("vehicle_plate", sa.String(length=30), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_booking_id", sa.String(length=40), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drivers")),
        sa.UniqueConstraint("phone", name=op.f("uq_drivers_phone")),
    )
    with op.batch_alter_table("drivers", schema=None) as batch_op:
        batch_op.create_index("ix_drivers_status_last_seen_at", ["status", "last_seen_at"], unique=False)

    op.create_table(
        "events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_topic_id", ["topic", "id"], unique=False)

    op.create_table(
        "notifications",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("category", sa.String(length=40), nullable=False),
        sa.Column("recipient", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("subject", sa.String(length=80), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("provider_message_id", sa.String(length=200), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_notifications_idempotency_key")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index("ix_notifications_recipient", ["recipient"], unique=False)
        batch_op.create_index(
            "ix_notifications_status_next_attempt_at", ["status", "next_attempt_at"], unique=False
        )
        batch_op.create_index("ix_notifications_subject", ["subject"], unique=False)

    op.create_table(
        "bookings",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("customer_name", sa.String(length=200), nullable=False),
        sa.Column("customer_phone", sa.String(length=20), nullable=False),
        sa.Column("pickup_address", sa.Text(), nullable=False),
        sa.Column("pickup_lat", sa.Float(), nullable=True),
        sa.Column("pickup_lon", sa.Float(), nullable=True),
        sa.Column("drop_address", sa.Text(), nullable=False),
        sa.Column("drop_lat", sa.Float(), nullable=True),
        sa.Column("drop_lon", sa.Float(), nullable=True),
        sa.Column("pickup_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("driver_id", sa.String(length=40), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("search_options", sa.JSON(), nullable=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("search_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("search_deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_wave_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["driver_id"], ["drivers.id"], name=op.f("fk_bookings_driver_id_drivers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bookings")),
    )
    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.create_index("ix_bookings_status_next_wave_at", ["status", "next_wave_at"], unique=False)
        batch_op.create_index(
            "ix_bookings_status_search_deadline_at", ["status", "search_deadline_at"], unique=False
        )
        batch_op.create_index(
            "uq_bookings_active_driver",
            ["driver_id"],
            unique=True,
            sqlite_where=sa.text("status = 'ASSIGNED'"),
            postgresql_where=sa.text("status = 'ASSIGNED'"),
        )

    op.create_table(
        "booking_offers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("booking_id", sa.String(length=40), nullable=False),
        sa.Column("driver_id", sa.String(length=40), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("distance_km", sa.Float(), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("responded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("response", sa.String(length=16), nullable=True),
        sa.Column("driver_answer", sa.String(length=8), nullable=True),
        sa.Column("response_time_ms", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["booking_id"],
            ["bookings.id"],
            name=op.f("fk_booking_offers_booking_id_bookings"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["driver_id"],
            ["drivers.id"],
            name=op.f("fk_booking_offers_driver_id_drivers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_booking_offers")),
        sa.UniqueConstraint("booking_id", "driver_id", name=op.f("uq_booking_offers_booking_id_driver_id")),
    )
    with op.batch_alter_table("booking_offers", schema=None) as batch_op:
        batch_op.create_index("ix_booking_offers_driver_id_sent_at", ["driver_id", "sent_at"], unique=False)
        batch_op.create_index(
            "ix_booking_offers_open_expires_at",
            ["expires_at"],
            unique=False,
            sqlite_where=sa.text("response IS NULL"),
            postgresql_where=sa.text("response IS NULL"),
        )
        batch_op.create_index("ix_booking_offers_response", ["response"], unique=False)
        batch_op.create_index("ix_booking_offers_sent_at", ["sent_at"], unique=False)

    op.create_table(
        "matching_metrics",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("booking_id", sa.String(length=40), nullable=False),
        sa.Column("total_drivers_notified", sa.Integer(), nullable=False),
        sa.Column("total_drivers_responded", sa.Integer(), nullable=False),
        sa.Column("total_timeouts", sa.Integer(), nullable=False),
        sa.Column("waves", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("time_to_match_s", sa.Float(), nullable=True),
        sa.Column("final_status", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["booking_id"],
            ["bookings.id"],
            name=op.f("fk_matching_metrics_booking_id_bookings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_matching_metrics")),
        sa.UniqueConstraint("booking_id", name=op.f("uq_matching_metrics_booking_id")),
    )
    with op.batch_alter_table("matching_metrics", schema=None) as batch_op:
        batch_op.create_index("ix_matching_metrics_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("matching_metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_matching_metrics_created_at")

    op.drop_table("matching_metrics")
    with op.batch_alter_table("booking_offers", schema=None) as batch_op:
        batch_op.drop_index("ix_booking_offers_sent_at")
        batch_op.drop_index("ix_booking_offers_response")
        batch_op.drop_index(
            "ix_booking_offers_open_expires_at",
            sqlite_where=sa.text("response IS NULL"),
            postgresql_where=sa.text("response IS NULL"),
        )
        batch_op.drop_index("ix_booking_offers_driver_id_sent_at")

    op.drop_table("booking_offers")
    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_bookings_active_driver",
            sqlite_where=sa.text("status = 'ASSIGNED'"),
            postgresql_where=sa.text("status = 'ASSIGNED'"),
        )
        batch_op.drop_index("ix_bookings_status_search_deadline_at")
        batch_op.drop_index("ix_bookings_status_next_wave_at")

    op.drop_table("bookings")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_subject")
        batch_op.drop_index("ix_notifications_status_next_attempt_at")
        batch_op.drop_index("ix_notifications_recipient")

    op.drop_table("notifications")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_topic_id")

    op.drop_table("events")
    with op.batch_alter_table("drivers", schema=None) as batch_op:
        batch_op.drop_index("ix_drivers_status_last_seen_at")

    op.drop_table("drivers")
    op.drop_table("api_keys")
