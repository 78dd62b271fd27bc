"""What the v1 API answers, as the client hands it out: typed records (models, datasets, jobs with their
artifact, events), the client's errors, and the parsing of a job's Server-Sent Event stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from modelpress.job_status import TERMINAL, JobStatus


class ClientError(Exception):
    """The API answered an error: `status`, the machine-readable `error` and the human `detail`."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class ServerError(ClientError):
    """5xx, or 429/503 still answered after every retry."""


class ConnectionFailed(ClientError):
    """The server could not be reached after every retry (status 0)."""


T = TypeVar("T", bound="_Record")


@dataclass
class _Record:
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in fields(cls)} - {"raw"}
        values = {k: v for k, v in data.items() if k in names}
        return cls(raw=data, **values)


@dataclass
class Model(_Record):
    id: str = ""
    name: str = ""
    format: str = ""
    size_bytes: int = 0
    sha256: str = ""
    status: str = ""
    created_at: str | None = None
    architecture: dict[str, Any] | None = None
    inspection: dict[str, Any] | None = None


@dataclass
class Dataset(_Record):
    id: str = ""
    name: str = ""
    format: str = ""
    size_bytes: int = 0
    sha256: str = ""
    created_at: str | None = None
    info: dict[str, Any] | None = None


@dataclass
class Artifact(_Record):
    size_bytes: int = 0
    sha256: str = ""
    format: str = ""
    download_url: str = ""
    requires: list[str] = field(default_factory=list)


@dataclass
class Job(_Record):
    id: str = ""
    status: str = JobStatus.QUEUED  # a plain string: a status this client does not know yet stays readable
    progress: float = 0.0
    stage: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    attempt: int = 0
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    metrics: dict[str, Any] | None = None
    artifact: Artifact | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        job = super().from_dict(data)
        if isinstance(job.artifact, dict):
            job.artifact = Artifact.from_dict(job.artifact)
        return job

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Event:
    """One Server-Sent Event of a job: kind is state, progress, epoch, log, ... or end."""

    kind: str
    data: dict[str, Any]
    id: str | None = None


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    data: list[str] = []
    kind: str = "message"
    event_id: str | None = None
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except json.JSONDecodeError:
                    payload = {"text": text}
                yield Event(kind, payload if isinstance(payload, dict) else {"value": payload}, event_id)
            kind, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
