"""Python client of the ModelPress v1 API.

    from modelpress.client import Client

    with Client("http://127.0.0.1:8000", api_key) as mp:
        model = mp.upload_model("model.pt")
        job = mp.submit({"model_id": model.id, "example_input_shape": [1, 64],
                         "stages": [{"method": "quantize", "scheme": "dynamic_int8"}]})
        job = mp.wait(job.id, progress=lambda j: print(f"{j.progress:.0%} {j.stage}"))
        mp.download(job.id, "model.int8.pt")

Every call retries 429 and 503 (honouring `Retry-After`) and connection errors with
exponential backoff and jitter. Every `submit` carries an `Idempotency-Key` (one uuid4
per call, the same on each of its retries), so a retried submit never makes a second job.
A 4xx answer raises `ClientError(status, error, detail)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from modelpress.client_records import (
    Artifact,
    ClientError,
    ConnectionFailed,
    Dataset,
    Event,
    Job,
    Model,
    ServerError,
    _parse_sse,
)
from modelpress.job_status import TERMINAL, JobStatus

__all__ = [
    "Client",
    "ClientError",
    "ServerError",
    "ConnectionFailed",
    "Model",
    "Dataset",
    "Job",
    "Artifact",
    "Event",
    "TERMINAL",
    "JobStatus",
]


RETRY_STATUSES = (429, 503)
DEFAULT_URL = "http://127.0.0.1:8000"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and "error" in body:
        return str(body["error"]), str(body.get("detail", ""))
    return response.reason_phrase or "HTTPError", response.text[:500]


class Client:
    """A ModelPress API client. `url` and `api_key` default to MODELPRESS_URL and MODELPRESS_API_KEY."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = (url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("MODELPRESS_API_KEY")
        if not key:
            raise ValueError("an API key is needed: pass api_key or set MODELPRESS_API_KEY")
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "modelpress-client/1"},
        )

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s * 4)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter"

    def _request(
        self,
        method: str,
        path: str,
        *,
        safe_to_resend: bool = True,
        files: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries. `safe_to_resend` is false for requests that might have been acted on
        before the connection broke and have no idempotency key: those retry only on a refused connect.
        `files` is a factory so that a retry re-opens the upload from its start."""
        attempt = 0
        while True:
            opened: list[Any] = []
            try:
                if files is not None:
                    parts = files()
                    opened = [v[1] for v in parts.values() if hasattr(v[1], "close")]
                    kwargs["files"] = parts
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                retriable = safe_to_resend or isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
                if not retriable or attempt >= self.max_retries:
                    raise ConnectionFailed(0, type(error).__name__, f"{method} {self.url}{path}: {error}") from error
                self._sleep(self._delay(attempt, None))
                attempt += 1
                continue
            finally:
                for handle in opened:
                    handle.close()
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                self._sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if response.status_code >= 400:
                error_name, detail = _error_of(response)
                cls = (
                    ServerError
                    if response.status_code >= 500 or response.status_code in RETRY_STATUSES
                    else ClientError
                )
                raise cls(response.status_code, error_name, detail)
            return response

    # ------------------------------------------------------------------ models and datasets

    def upload_model(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        format: str | None = None,
        architecture: dict[str, Any] | str | None = None,
    ) -> Model:
        """Upload a model file (TorchScript, state_dict, safetensors or exported program).
        Weight-only formats need `architecture`: {"name": ..., "kwargs": {...}}."""
        source = Path(path)
        data: dict[str, str] = {"name": name or source.name}
        if format:
            data["format"] = format
        if architecture is not None:
            data["architecture"] = architecture if isinstance(architecture, str) else json.dumps(architecture)
        response = self._request(
            "POST",
            "/v1/models",
            data=data,
            safe_to_resend=False,
            files=lambda: {"file": (source.name, open(source, "rb"))},
        )
        return Model.from_dict(response.json())

    def get_model(self, model_id: str) -> Model:
        return Model.from_dict(self._request("GET", f"/v1/models/{model_id}").json())

    def models(self, limit: int = 50) -> list[Model]:
        return [Model.from_dict(m) for m in self._request("GET", "/v1/models", params={"limit": limit}).json()["items"]]

    def upload_dataset(self, path: str | os.PathLike[str], name: str | None = None) -> Dataset:
        """Upload an .npz (no pickles) or .safetensors dataset with `inputs` and optional `labels`."""
        source = Path(path)
        response = self._request(
            "POST",
            "/v1/datasets",
            data={"name": name or source.name},
            safe_to_resend=False,
            files=lambda: {"file": (source.name, open(source, "rb"))},
        )
        return Dataset.from_dict(response.json())

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_dict(self._request("GET", f"/v1/datasets/{dataset_id}").json())

    def datasets(self, limit: int = 50) -> list[Dataset]:
        items = self._request("GET", "/v1/datasets", params={"limit": limit}).json()["items"]
        return [Dataset.from_dict(d) for d in items]

    def methods(self) -> dict[str, Any]:
        """The catalogue of methods, schemes and options (GET /v1/methods)."""
        return dict(self._request("GET", "/v1/methods").json())

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> Job:
        """POST /v1/jobs. One Idempotency-Key per call (a fresh uuid4 unless given), reused by its retries."""
        key = idempotency_key or str(uuid.uuid4())
        response = self._request("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return Job.from_dict(response.json())

    def get_job(self, job_id: str) -> Job:
        return Job.from_dict(self._request("GET", f"/v1/jobs/{job_id}").json())

    def jobs(
        self,
        status: str | None = None,
        model_id: str | None = None,
        method: str | None = None,
        page_size: int = 50,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """Every matching job, newest first, following the cursor from page to page."""
        params: dict[str, Any] = {
            k: v for k, v in (("status", status), ("model_id", model_id), ("method", method)) if v
        }
        params["limit"] = page_size
        seen = 0
        while True:
            page = self._request("GET", "/v1/jobs", params=params).json()
            for item in page["items"]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Job.from_dict(item)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> Job:
        return Job.from_dict(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[Event]:
        """The job's Server-Sent Events until `end`; reconnects with Last-Event-ID when the stream drops."""
        last_id: str | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            try:
                read_timeout = 60.0 if deadline is None else max(1.0, min(60.0, deadline - time.monotonic()))
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(10.0, read=read_timeout)
                ) as response:
                    if response.status_code in RETRY_STATUSES and failures < self.max_retries:
                        response.read()
                        self._sleep(self._delay(failures, response))
                        failures += 1
                        continue
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(response.status_code, *_error_of(response))
                    for event in _parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id:
                            last_id = event.id
                        yield event
                        if event.kind == "end":
                            return
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id} still running after {timeout}s")
            except httpx.TransportError as error:
                if failures >= self.max_retries:
                    raise ConnectionFailed(0, type(error).__name__, f"event stream of {job_id}: {error}") from error
                self._sleep(self._delay(failures, None))
                failures += 1
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout}s")

    def wait(
        self,
        job_id: str,
        progress: Callable[[Job], None] | None = None,
        poll_s: float = 1.0,
        timeout: float | None = None,
        use_events: bool = True,
    ) -> Job:
        """Block until the job ends and return it. `progress(job)` is called on every change.
        Follows the event stream; falls back to polling every `poll_s` when streaming is unavailable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get_job(job_id)
        if progress:
            progress(job)
        if job.done:
            return job
        if use_events:
            try:
                for event in self.events(job_id, timeout=timeout):
                    if event.kind == "progress":
                        job.progress = float(event.data.get("progress", job.progress))
                        job.stage = event.data.get("stage", job.stage)
                    elif event.kind == "state" and "status" in event.data:
                        job.status = event.data["status"]
                    elif event.kind == "end":
                        break
                    else:
                        continue
                    if progress:
                        progress(job)
                job = self.get_job(job_id)
                if progress:
                    progress(job)
                if job.done:
                    return job
            except (ConnectionFailed, ServerError):
                pass  # fall back to polling
        while True:
            job = self.get_job(job_id)
            if progress:
                progress(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
            self._sleep(poll_s)

    def report(self, job_id: str) -> str:
        """The job's self-contained HTML report (GET /v1/jobs/{id}/report)."""
        return self._request("GET", f"/v1/jobs/{job_id}/report").text

    def save_report(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.report(job_id), encoding="utf-8")
        return target

    def compare(self, model_id: str, job_ids: list[str] | None = None, chart: bool = False) -> dict[str, Any]:
        """Headline figures of several jobs of one model, side by side (GET /v1/models/{id}/jobs/compare);
        without `job_ids`, the model's newest succeeded jobs."""
        params: dict[str, Any] = {"chart": str(chart).lower()}
        if job_ids:
            params["ids"] = ",".join(job_ids)
        return dict(self._request("GET", f"/v1/models/{model_id}/jobs/compare", params=params).json())

    def download(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream the job's artifact to `path` (written whole or not at all) and check its sha256."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        for attempt in range(self.max_retries + 1):
            digest = hashlib.sha256()
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        response.read()
                        self._sleep(self._delay(attempt, response))
                        continue
                    if response.status_code >= 400:
                        response.read()
                        error, detail = _error_of(response)
                        raise (ServerError if response.status_code >= 500 else ClientError)(
                            response.status_code, error, detail
                        )
                    etag = response.headers.get("ETag", "").strip('"')
                    with open(partial, "wb") as handle:
                        for chunk in response.iter_bytes(1024 * 1024):
                            digest.update(chunk)
                            handle.write(chunk)
            except httpx.TransportError as error:
                partial.unlink(missing_ok=True)
                if attempt >= self.max_retries:
                    raise ConnectionFailed(0, type(error).__name__, f"download of {job_id}: {error}") from error
                self._sleep(self._delay(attempt, None))
                continue
            if etag and etag != digest.hexdigest():
                partial.unlink(missing_ok=True)
                raise ClientError(0, "ChecksumMismatch", f"artifact of {job_id} does not match its ETag")
            partial.replace(target)
            return target
        raise AssertionError("unreachable")
