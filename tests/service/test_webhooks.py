"""Webhooks cannot reach the service's own network: refused at submit and at send; a listener proves it."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.tables import Job, JobEvent
from app.webhooks import WebhookRefused, resolve_vetted
from tests.service.conftest import Api
from tests.service.test_api import assert_error, counts, upload_ts

pytestmark = pytest.mark.postgres


@dataclass
class Listener:
    port: int
    received: list[dict] = field(default_factory=list)
    redirect_to: str | None = None


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A real HTTP server on loopback recording every request that reaches it."""
    state = Listener(port=0)

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            state.received.append(
                {
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "body": json.loads(self.rfile.read(length) or b"null"),
                }
            )
            if state.redirect_to and self.path != state.redirect_to:
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
            else:
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Hook)
    state.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


LOOPBACK_FORMS = [
    "http://127.0.0.1:{port}/a",
    "http://localhost:{port}/b",
    "http://LocalHost.:{port}/c",
    "http://[::1]:{port}/d",
    "http://0.0.0.0:{port}/e",
    "http://2130706433:{port}/f",
    "http://0x7f000001:{port}/g",
    "http://0177.0.0.1:{port}/h",
    "http://127.1:{port}/i",
    "http://[::ffff:127.0.0.1]:{port}/j",
    "http://[::ffff:7f00:1]:{port}/k",
    "http://[64:ff9b::7f00:1]:{port}/l",
    "http://api.localhost:{port}/m",
]
OTHER_INTERNAL = [
    "http://169.254.169.254/latest/meta-data",
    "http://[fd00:ec2::254]/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://[::]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "ftp://example.com/hook",
    "http://user:secret@example.com/hook",
]


def submit_with_webhook(api: Api, model_id: str, url: str):  # type: ignore[no-untyped-def]
    return api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model_id,
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
            "webhook_url": url,
        },
    )


def test_internal_webhook_urls_answer_422_at_submit(api: Api, listener: Listener) -> None:
    model = upload_ts(api)
    for url in [u.format(port=listener.port) for u in LOOPBACK_FORMS] + OTHER_INTERNAL:
        response = submit_with_webhook(api, model["id"], url)
        assert "webhook_url" in assert_error(response, 422, "InvalidRequest")["detail"], url
    assert counts()[2] == 0
    assert listener.received == []
    accepted = submit_with_webhook(api, model["id"], "https://hooks.example.com/modelpress")
    assert accepted.status_code == 202, accepted.text


def finished_job_with_webhook(api: Api, url: str) -> str:
    """A finished job whose stored webhook_url skipped the submit check (an old row, a changed DNS answer)."""
    model = upload_ts(api)
    response = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
            "example_input_shape": [1, 8],
        },
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.spec = {**job.spec, "webhook_url": url}
        job.status = "failed"
    return job_id


def webhook_events(job_id: str) -> list[dict]:
    with session_scope() as session:
        return [
            e.data
            for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "webhook"))
        ]


@pytest.mark.parametrize(
    "form",
    [
        "http://127.0.0.1:{port}/a",
        "http://localhost:{port}/b",
        "http://[::ffff:7f00:1]:{port}/c",
        "http://0.0.0.0:{port}/d",
    ],
)
def test_internal_webhook_is_refused_at_send_and_recorded(api: Api, listener: Listener, form: str) -> None:
    from worker.runner import notify_webhook

    job_id = finished_job_with_webhook(api, form.format(port=listener.port))
    notify_webhook(job_id)
    (event,) = webhook_events(job_id)
    assert event["refused"] and "status_code" not in event, event
    assert listener.received == []


def test_send_time_resolution_refuses_names_that_resolve_inward(api: Api) -> None:
    # resolve_vetted judges the resolved addresses only, not the name: localhost is refused for 127.0.0.1
    with pytest.raises(WebhookRefused, match="resolves to 127.0.0.1 is a loopback"):
        resolve_vetted("localhost", 80)
    hostname = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(hostname, 80, type=socket.SOCK_STREAM)}
    if all(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        with pytest.raises(WebhookRefused, match="resolves to"):
            resolve_vetted(hostname, 80)


def test_an_allowed_internal_host_receives_the_post(
    api: Api, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import get_settings
    from worker.runner import notify_webhook

    monkeypatch.setattr(get_settings(), "webhook_allowed_hosts", ["localhost"])
    model = upload_ts(api)
    url = f"http://localhost:{listener.port}/hook"
    assert submit_with_webhook(api, model["id"], url).status_code == 202
    assert (
        "webhook_url"
        in assert_error(submit_with_webhook(api, model["id"], f"http://127.0.0.1:{listener.port}/"), 422)["detail"]
    )  # only the named host is allowed, not every loopback URL
    job_id = finished_job_with_webhook(api, url)
    notify_webhook(job_id)
    (event,) = webhook_events(job_id)
    assert event["status_code"] == 204, event
    (request,) = listener.received
    assert request["path"] == "/hook" and request["host"] == f"localhost:{listener.port}"
    assert request["body"]["id"] == job_id and request["body"]["status"] == "failed"


def test_redirects_are_not_followed(api: Api, listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import get_settings
    from worker.runner import notify_webhook

    monkeypatch.setattr(get_settings(), "webhook_allowed_hosts", ["localhost"])
    listener.redirect_to = "/elsewhere"
    job_id = finished_job_with_webhook(api, f"http://localhost:{listener.port}/hook")
    notify_webhook(job_id)
    (event,) = webhook_events(job_id)
    assert event["status_code"] == 302, event
    assert [r["path"] for r in listener.received] == ["/hook"]
