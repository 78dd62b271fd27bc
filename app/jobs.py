"""Rules for jobs: validate at submit, idempotent create, cancel, and the read model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import job_states
from app.config import get_settings
from app.errors import Conflict, Invalid, QuotaExceeded
from app.job_states import JobAlreadyFinished, JobStatus
from app.outbox import enqueue
from app.queue import RUN_JOB
from app.repositories import job_reads
from app.repositories import jobs as jobs_repo
from app.repositories.owned import get_owned
from app.resources import get_dataset, get_model
from app.schemas import ArtifactRead, JobCreate, JobRead
from app.tables import Artifact, Job, Tenant
from app.workers import max_train_devices
from modelpress.catalog import (
    JobFacts,
    SpecError,
    expand_preset,
    resolve_runtime,
    trial_refusals,
    validate_forward_call,
    validate_stages,
    validate_target,
)


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dataset_has_labels(info: dict[str, Any] | None) -> bool:
    return bool(info) and "labels" in (info or {}).get("arrays", [])


def validate_job(session: Session, tenant: Tenant, job_in: JobCreate) -> dict[str, Any]:
    """Everything that can be checked without loading the model; returns the normalised spec."""
    model = get_model(session, tenant, job_in.model_id)
    if model.status == "rejected":
        raise Invalid(f"model {model.id} was rejected at inspection: {(model.inspection or {}).get('error')}")
    dataset = get_dataset(session, tenant, job_in.dataset_id) if job_in.dataset_id else None
    evaluation = get_dataset(session, tenant, job_in.eval_dataset_id) if job_in.eval_dataset_id else None
    # the stages' own options were checked as their typed configs when the request was read
    stages: list[dict[str, Any]] = [stage.as_stage() for stage in job_in.stages]
    try:
        if job_in.preset:
            if stages:
                raise SpecError("give either a preset or stages, not both")
            stages = expand_preset(job_in.preset)
        if job_in.search is not None:
            if stages:
                raise SpecError("give either search or stages, not both")
            stages = [dict(job_in.search, method="search")]
        facts = JobFacts(
            model_format=model.format,
            device=job_in.target.device,
            has_dataset=dataset is not None,
            dataset_has_labels=_dataset_has_labels(dataset.info if dataset else None),
            eval_has_labels=_dataset_has_labels(evaluation.info if evaluation else None),
            max_train_devices=max_train_devices(session, job_in.target.device),
            graph_conversion_error=(model.inspection or {}).get("graph_conversion_error"),
            trial_refusals=trial_refusals(model.inspection),
        )
        if job_in.inputs is not None and job_in.example_input_shape is not None:
            raise SpecError("give inputs or example_input_shape (the one-float-tensor shorthand), not both")
        declared = [i.model_dump() for i in job_in.inputs] if job_in.inputs is not None else None
        validate_forward_call(declared, job_in.forward_kwargs, job_in.output)
        runtime = resolve_runtime(
            job_in.target.runtime, "runtime" in job_in.target.model_fields_set, job_in.output_format
        )
        validate_target(
            runtime, job_in.target.device, job_in.output_format, stages, model.format, installed=_package_installed
        )
        # a job for another runtime may have no stage: a conversion, verified in that runtime
        facts = dataclasses.replace(facts, runtime=runtime)
        validated = validate_stages(stages, facts) if stages or runtime == "torch" else []
    except SpecError as error:
        raise Invalid(str(error)) from error
    # a job that declares no inputs takes those declared with the model at upload
    inputs = declared if declared is not None else (model.inputs if job_in.example_input_shape is None else None)
    if model.format == "huggingface" and model.status == "pending" and not inputs and dataset is None:
        raise Invalid(
            f"model {model.id} is still being inspected: its inputs are read from its config.json then; "
            "submit once the model is ready, or declare inputs"
        )
    if job_in.example_input_shape is None and not inputs and dataset is None and evaluation is None:
        raise Invalid("example_input_shape (or inputs) is required when no dataset gives the input shape")
    if job_in.example_input_shape is not None and any(d <= 0 for d in job_in.example_input_shape):
        raise Invalid("example_input_shape must hold positive sizes")
    if job_in.output_format == "exported_program" and model.format == "torchscript":
        raise Invalid("a TorchScript model cannot be turned into an exported program; use output_format torchscript")
    for which, data in (("dataset", dataset), ("eval dataset", evaluation)):
        if data is not None and inputs and len(inputs) > 1:
            check_dataset_names(inputs, data.info or {}, which)
        elif data is not None:
            check_dataset_fits_model(model.inspection, data.info or {}, which)
    if job_in.example_input_shape is not None and not inputs:
        check_input_shape_fits_model(model.inspection, job_in.example_input_shape, "example_input_shape")
    extra_models: list[str] = []
    for stage in validated:
        student = stage.options.get("student")
        if isinstance(student, dict) and "model_id" in student:
            get_model(session, tenant, student["model_id"])
            extra_models.append(student["model_id"])
    spec = job_in.model_dump(mode="json")
    spec["inputs"] = inputs
    # and the constant arguments declared with the model, when it gives none
    if job_in.forward_kwargs is None and model.forward_kwargs:
        spec["forward_kwargs"] = model.forward_kwargs
    spec["target"]["runtime"] = runtime
    spec["stages"] = [v.config.as_stage() for v in validated]
    spec["extra_model_ids"] = extra_models
    from app.workers import device_problem, require_live_worker

    if problem := device_problem(session, job_in.target.device):
        if require_live_worker():
            raise Invalid(problem)
        spec["warnings"] = [f"{problem}; the job stays queued until such a worker starts"]
    return spec


def _package_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _model_input(inspection: dict[str, Any] | None) -> dict[str, Any] | None:
    signature = (inspection or {}).get("input_signature")
    if isinstance(signature, list) and len(signature) == 1 and isinstance(signature[0], dict):
        return signature[0]
    return None


def check_input_shape_fits_model(inspection: dict[str, Any] | None, shape: list[int], what: str) -> None:
    """Compare per-sample sizes with the inspected input signature, where the model has a fixed one."""
    expected = _model_input(inspection)
    if expected is None:
        return  # not known before a worker runs it (TorchScript, or inspection still pending)
    wanted = expected["shape"][1:]
    given = list(shape[1:])
    if len(wanted) != len(given) or any(w.isdigit() and int(w) != g for w, g in zip(wanted, given)):
        raise Invalid(f"{what} has per-sample shape {given}, but the model takes {wanted}")


def check_dataset_names(inputs: list[dict[str, Any]], info: dict[str, Any], which: str) -> None:
    """A dataset for a model of several inputs holds one array per input name."""
    arrays = info.get("arrays")
    if not isinstance(arrays, list):
        return
    missing = [spec["name"] for spec in inputs if spec["name"] not in arrays]
    if missing:
        raise Invalid(
            f"the {which} has no array named {missing} (it holds {sorted(arrays)}); the model takes "
            f"inputs {[spec['name'] for spec in inputs]}"
        )


def check_dataset_fits_model(inspection: dict[str, Any] | None, info: dict[str, Any], which: str) -> None:
    """Input shape, dtype and label range of a dataset against what inspection learned of the model."""
    shapes, dtypes = info.get("shapes") or {}, info.get("dtypes") or {}
    if "inputs" in shapes:
        check_input_shape_fits_model(inspection, shapes["inputs"], f"the {which}'s inputs")
    expected = _model_input(inspection)
    dtype = str(dtypes.get("inputs", ""))
    if expected is not None and "float" in expected.get("dtype", "") and dtype[1:2] in ("i", "u", "b"):
        raise Invalid(f"the {which}'s inputs are {dtype} integers, but the model takes {expected['dtype']}")
    output = (inspection or {}).get("output_shape")
    label_range = info.get("label_range")
    if label_range and output and len(output) == 2:
        classes = int(output[1])
        if label_range[0] < 0 or label_range[1] >= classes:
            raise Invalid(
                f"the {which}'s labels span {label_range[0]}..{label_range[1]}, but the model has {classes} outputs"
            )


def create_job(
    session: Session, *, tenant: Tenant, job_in: JobCreate, idempotency_key: str | None
) -> tuple[Job, int | None]:
    """Insert the job and its outbox row in one transaction; returns (job, outbox id to publish)."""
    body_hash = request_hash(job_in.model_dump(mode="json"))
    if idempotency_key:
        existing = jobs_repo.by_idempotency_key(session, tenant_id=tenant.id, key=idempotency_key)
        if existing is not None:
            if existing.request_hash != body_hash:
                raise Invalid("this Idempotency-Key was used with a different request body")
            return existing, None
    spec = validate_job(session, tenant, job_in)
    # Count and insert under a lock on the tenant's row, so concurrent submits cannot all see room
    # for one more job (Postgres; SQLite already runs one writer at a time, and ignores FOR UPDATE).
    jobs_repo.lock_tenant(session, tenant_id=tenant.id)
    active = jobs_repo.count_active(session, tenant_id=tenant.id)
    limit = get_settings().max_queued_jobs_per_tenant
    if active >= limit:
        raise QuotaExceeded(
            f"tenant already has {active} queued or running jobs (limit {limit})", headers={"Retry-After": "30"}
        )
    queue = "gpu" if job_in.target.device == "cuda" else "cpu"
    method = spec["stages"][0]["method"] if spec["stages"] else "convert"  # a conversion to another runtime
    job = Job(
        tenant_id=tenant.id,
        model_id=job_in.model_id,
        method=method,
        status=job_states.INITIAL,
        spec=spec,
        queue=queue,
        priority=job_in.priority,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
    )
    try:
        # a savepoint: when a concurrent request with the same Idempotency-Key won the race,
        # the unique constraint fires and we answer with that request's job instead
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        if not idempotency_key:
            raise
        winner = jobs_repo.by_idempotency_key(session, tenant_id=tenant.id, key=idempotency_key)
        if winner is None:
            raise
        if winner.request_hash != body_hash:
            raise Invalid("this Idempotency-Key was used with a different request body") from None
        return winner, None
    job_states.record_created(session, job)
    message = enqueue(session, task=RUN_JOB, object_id=job.id, queue=queue, priority=job_in.priority)
    return job, message.id


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    return get_owned(session, Job, tenant_id=tenant.id, object_id=job_id, label="job")


def cancel_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    try:
        job_states.cancel(session, job)
    except JobAlreadyFinished as error:  # finished already (or while a worker claimed it)
        raise Conflict(str(error)) from error
    session.flush()
    return job


def list_jobs(
    session: Session,
    tenant: Tenant,
    *,
    status: JobStatus | None,
    model_id: str | None,
    method: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Job], str | None]:
    rows, next_cursor = jobs_repo.page(
        session, tenant_id=tenant.id, status=status, model_id=model_id, method=method, limit=limit, cursor=cursor
    )
    return [row[0] for row in rows], next_cursor


def list_job_reads(
    session: Session,
    tenant: Tenant,
    *,
    status: JobStatus | None,
    model_id: str | None,
    method: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[JobRead], str | None]:
    """A page of jobs with their metrics and artifacts, in one query."""
    after = jobs_repo.cursor_position(session, cursor)
    rows = job_reads.list_page(
        session, tenant.id, status=status, model_id=model_id, method=method, after=after, limit=limit
    )
    reads = job_reads.job_reads_from_rows(rows[:limit])
    next_cursor = jobs_repo.cursor_after(reads[-1].created_at, reads[-1].id) if len(rows) > limit else None
    return reads, next_cursor


def job_read(session: Session, job: Job) -> JobRead:
    return _job_read(job, *jobs_repo.results_of(session, job_id=job.id))


def read_job(session: Session, tenant: Tenant, job_id: str) -> JobRead:
    """The tenant's job with its metrics and artifact in one query (GET /v1/jobs/{id} is what clients poll)."""
    return job_reads.read_job(session, tenant.id, job_id)


def _job_read(job: Job, metrics_document: dict[str, Any] | None, artifact: Artifact | None) -> JobRead:
    return JobRead(
        id=job.id,
        status=job.status,
        progress=job.progress,
        stage=job.stage,
        spec=job.spec,
        error=job.error,
        attempt=job.attempt,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        metrics=metrics_document,
        artifact=ArtifactRead(
            size_bytes=artifact.size_bytes,
            sha256=artifact.sha256,
            format=artifact.format,
            requires=artifact.requires or [],
            download_url=f"/v1/jobs/{job.id}/artifact",
        )
        if artifact
        else None,
    )
