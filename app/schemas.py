"""Request and response shapes of the v1 API (see shared API.md)."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    error: str = Field(examples=["InvalidRequest"])
    detail: str = Field(examples=["stages[0].amount must be < 1.0, got 1.5"])


class ModelRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    architecture: dict[str, Any] | None = None
    size_bytes: int
    sha256: str
    created_at: datetime
    status: Literal["pending", "ready", "rejected"]
    inspection: dict[str, Any] | None = None


class ModelList(BaseModel):
    items: list[ModelRead]
    next_cursor: str | None = None


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    created_at: datetime
    info: dict[str, Any] | None = None


class DatasetList(BaseModel):
    items: list[DatasetRead]
    next_cursor: str | None = None


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=64, description="CPU threads for latency measurement")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model_id": "mdl_0123456789abcdef01234567",
        "stages": [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.8},
                   {"method": "quantize", "scheme": "dynamic_int8"}],
        "example_input_shape": [1, 64], "target": {"device": "cpu"}, "output_format": "torchscript"}]})
    model_id: str
    stages: list[dict[str, Any]] = Field(default_factory=list)
    preset: str | None = None
    search: dict[str, Any] | None = None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    example_input_shape: list[int] | None = Field(None, min_length=1, max_length=8)
    target: Target = Field(default_factory=Target)
    output_format: Literal["torchscript", "exported_program", "state_dict", "sparse_state_dict",
                           "compact_state_dict"] | None = None
    webhook_url: AnyHttpUrl | None = Field(None, description="POSTed the job summary when it finishes")
    priority: int = Field(5, ge=0, le=9, description="0..9, 9 runs first")
    seed: int = 0


class ArtifactRead(BaseModel):
    size_bytes: int
    sha256: str
    format: str
    requires: list[str] = Field(default_factory=list)
    download_url: str


class JobRead(BaseModel):
    id: str
    status: JobStatus
    progress: float
    stage: str | None
    spec: dict[str, Any]
    error: dict[str, Any] | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    metrics: dict[str, Any] | None
    artifact: ArtifactRead | None


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None = None
