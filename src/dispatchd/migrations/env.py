"""Alembic environment: always runs on a connection handed over by ``dispatchd.migrate``."""

from alembic import context

import dispatchd.core.auth  # noqa: F401  (register tables on the metadata)
import dispatchd.core.events  # noqa: F401
import dispatchd.core.idempotency  # noqa: F401
import dispatchd.matching.models  # noqa: F401
import dispatchd.notifications.models  # noqa: F401
import dispatchd.reservations.models  # noqa: F401
from dispatchd.core.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `dispatchd migrate`, which provides the connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
