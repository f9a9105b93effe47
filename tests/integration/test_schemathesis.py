"""The OpenAPI document tells the truth (issue 12): Schemathesis generates requests from it for every
operation, on SQLite and on PostgreSQL, with the admin key, and asserts no 5xx, no status code and no
content type the document does not list, and bodies that conform to their schemas.

Reproducible: Hypothesis runs derandomized (the examples follow from the schema alone, no random seed),
a bounded number per operation (``SCHEMATHESIS_MAX_EXAMPLES``, default 8). ``GET /v1/stream`` is left
out (an endless SSE stream), as is anything outside ``/v1`` and the probes (the console's HTML).
Run alone: ``.venv/bin/python -m pytest -q tests/integration/test_schemathesis.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dispatchd.app import create_app
from tests.conftest import ADMIN_KEY, free_port, make_settings, reset_postgres, run_blocking

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class ThreadServer:
    """A real uvicorn server on its own event loop in a thread (Schemathesis calls it synchronously)."""

    def __init__(self, db_url: str) -> None:
        app = create_app(_settings(db_url), background=False)
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            self.thread.join(0.02)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def api_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "sqlite":
        target = tmp_path_factory.mktemp("schemathesis") / "dispatchd.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        db_url = f"sqlite+aiosqlite:///{target}"
    else:
        db_url = request.getfixturevalue("postgres_url")
        run_blocking(reset_postgres, db_url)
    with ThreadServer(db_url) as url:
        yield url


def _settings(db_url: str):
    return make_settings(
        db_url, whatsapp_app_secret="st-secret", whatsapp_verify_token="st-verify", log_level="ERROR"
    )


def _document() -> dict:
    """The OpenAPI document, built without a server (no database is opened)."""
    return create_app(_settings("sqlite+aiosqlite:///unused.db"), background=False).openapi()


DOCUMENT = _document()
# Loaded at import (Schemathesis' lazy ``from_fixture`` does not work with pytest 9); the served copy is
# checked to be the same document below.
schema = schemathesis.openapi.from_dict(DOCUMENT).include(path_regex=r"^/v1/").exclude(path="/v1/stream")


def test_the_served_document_is_the_one_tested(api_url: str):
    import httpx

    assert httpx.get(f"{api_url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_the_api_answers_as_its_openapi_says(case, api_url: str):
    case.call_and_validate(base_url=api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=CHECKS)
