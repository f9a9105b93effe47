"""A `dispatchd worker` process learns of a new message at its commit, not at its next poll: every unit of
work that writes to the outbox notifies ``dispatchd_events`` on PostgreSQL, events or not."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from dispatchd.core.db import Database
from dispatchd.core.events import NOTIFY_CHANNEL
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Message
from tests.conftest import new_phone


@pytest.mark.postgres
async def test_a_commit_that_writes_only_messages_notifies_once_and_a_rollback_never(postgres_url):
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    listening = await asyncpg.connect(dsn)
    payloads: asyncio.Queue[str] = asyncio.Queue()
    await listening.add_listener(NOTIFY_CHANNEL, lambda *args: payloads.put_nowait(args[-1]))
    db = Database(postgres_url)
    try:
        with pytest.raises(RuntimeError):
            async with db.transaction() as session:
                await outbox.enqueue(session, [Message(recipient=new_phone(), category="customer", body="x")])
                raise RuntimeError("rolled back: no NOTIFY")
        async with db.transaction() as session:
            await outbox.enqueue(session, [Message(recipient=new_phone(), category="customer", body="y")])
            assert not session.info.get("events_written")  # no event in this unit of work
        async with db.transaction():  # nothing written: no NOTIFY
            pass
        await listening.execute(f"NOTIFY {NOTIFY_CHANNEL}, 'end'")  # a marker: they arrive in commit order
        received = []
        while not received or received[-1] != "end":
            received.append(await asyncio.wait_for(payloads.get(), timeout=5))
        assert received == ["", "end"]  # one NOTIFY: the committed outbox write's
    finally:
        await listening.close()
        await db.dispose()
