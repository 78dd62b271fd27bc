"""Request and response shapes of the v1 API (see shared API.md)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from app.webhooks import WebhookRefused, check_webhook_url
from modelpress.artifact_formats import OutputFormat
from modelpress.configs import SpecError, Stage, parse_stage
from modelpress.job_status import JobStatus
from modelpress.options import MAX_SEED, MAX_STAGES, object_size_problem

# One example input may hold at most this many elements (8 GiB as float32): larger shapes cannot
# be allocated on a worker, and sizes like 2^80 overflow torch's int64 arithmetic.
MAX_INPUT_ELEMENTS = 2**31
ShapeSize = Annotated[int, Field(ge=1, le=MAX_INPUT_ELEMENTS)]
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


InputName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class InputDecl(BaseModel):
    """One positional tensor of the model's forward (see API.md, "Inputs and outputs")."""

    model_config = ConfigDict(extra="forbid")
    name: InputName
    shape: list[ShapeSize] = Field(min_length=1, max_length=8)
    dtype: Literal["float16", "float32", "float64", "bfloat16", "int32", "int64", "bool"] = "float32"
    low: int | None = Field(None, ge=-(2**63), le=2**63, description="integers: lowest random value")
    high: int | None = Field(None, ge=-(2**63), le=2**63, description="integers: highest random value, exclusive")
    dynamic: list[Annotated[int, Field(ge=0, le=7)]] = Field(
        default_factory=list, max_length=8, description="dimensions that vary (batch, sequence)"
    )


ForwardKwargValue = bool | int | float | str | None
OutputSelector = Annotated[int, Field(ge=0, le=1023)] | Annotated[str, Field(min_length=1, max_length=128)]


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
    inputs: list[dict[str, Any]] | None = None
    forward_kwargs: dict[str, Any] | None = None


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
    runtime: Literal["torch", "onnxruntime", "executorch"] = Field(
        "torch", description="the runtime that serves the artifact; it is built for and measured in it"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=64, description="CPU threads for latency measurement")


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "mdl_0123456789abcdef01234567",
                    "stages": [
                        {"method": "prune", "scheme": "l1_unstructured", "amount": 0.8},
                        {"method": "quantize", "scheme": "dynamic_int8"},
                    ],
                    "example_input_shape": [1, 64],
                    "target": {"device": "cpu"},
                    "output_format": "torchscript",
                }
            ]
        },
    )
    model_id: Identifier
    # each stage is one scheme's typed config (modelpress.configs), keyed on method + scheme
    stages: list[Stage] = Field(
        default_factory=list,
        max_length=MAX_STAGES,
        description='{"method": ..., "scheme": ..., **options}; a method\'s default scheme applies when "scheme" '
        "is left out. GET /v1/methods lists each scheme's options with their JSON schema",
    )
    preset: Identifier | None = None
    search: dict[str, Any] | None = None
    dataset_id: Identifier | None = None
    eval_dataset_id: Identifier | None = None
    example_input_shape: list[ShapeSize] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description=f"sizes >= 1; their product (elements of one example batch) <= {MAX_INPUT_ELEMENTS}",
    )
    inputs: list[InputDecl] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="the forward's tensors in order (instead of example_input_shape); default: the model's",
    )
    forward_kwargs: dict[str, ForwardKwargValue] | None = Field(
        None, max_length=16, description='constant non-tensor keyword arguments of forward, e.g. {"sr": 16000}'
    )
    output: OutputSelector | None = Field(
        None,
        description="the output scored for accuracy and distillation: a tuple index or a dict key; "
        "default: the first floating tensor",
    )
    target: Target = Field(default_factory=Target)  # type: ignore[arg-type]  # pydantic's overloads reject a model class as factory
    output_format: OutputFormat | None = None
    webhook_url: AnyHttpUrl | None = Field(
        None,
        max_length=2048,
        description="POSTed the job summary when it finishes; loopback, private, link-local and other internal "
        "addresses are refused (at submit and, after resolving the host, at send)",
    )
    priority: int = Field(5, ge=0, le=9, description="0..9, 9 runs first")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("stages", mode="before")
    @classmethod
    def _typed_stages(cls, stages: Any) -> Any:
        # the length is checked before any stage is looked at, so a huge list costs no per-stage work;
        # each stage is parsed here for the one-line message naming the field ("stages[0].amount must be ...")
        if not isinstance(stages, list):
            return stages
        if len(stages) > MAX_STAGES:
            raise PydanticCustomError(
                "too_many_stages",
                "a job has at most {most} stages, got {given}",
                {"most": MAX_STAGES, "given": len(stages)},
            )
        try:
            return [parse_stage(stage, f"stages[{index}]") for index, stage in enumerate(stages)]
        except SpecError as error:
            # the message goes in the context: a template would read its braces as fields
            raise PydanticCustomError("invalid_stage", "{problem}", {"problem": str(error)}) from None

    @field_validator("example_input_shape")
    @classmethod
    def _bounded_product(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"the product of the sizes must be <= {MAX_INPUT_ELEMENTS}, got {math.prod(shape)}")
        return shape

    @field_validator("webhook_url")
    @classmethod
    def _public_webhook(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None:
            try:
                check_webhook_url(str(url))
            except WebhookRefused as refusal:
                raise ValueError(f"webhook refused: {refusal}") from None
        return url

    @field_validator("search")
    @classmethod
    def _bounded_search(cls, search: dict[str, Any] | None) -> dict[str, Any] | None:
        if search is not None and (problem := object_size_problem(search, "search")):
            raise ValueError(problem)
        return search


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
