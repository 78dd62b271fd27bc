"""claim -> fetch inputs -> run the engine in the sandbox -> store the artifact -> finish.

Every write after the claim is fenced by the attempt number: a stale run whose
lease was taken over can no longer change the job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app import job_states
from app.config import get_settings
from app.db import session_scope
from app.job_states import TERMINAL, JobStatus
from app.repositories import jobs as jobs_repo
from app.storage import get_store
from app.tables import Artifact, Job, JobEvent, JobMetrics, StoredDataset, StoredModel, utcnow
from modelpress.artifact_formats import extension_of
from worker.compression.errors import failure
from worker.db_retry import _is_connection_problem, with_database_retry
from worker.sandbox import WarmSandbox, run_sandboxed
from worker.slots import prestart_sandbox, sandbox_slot, slot_limits

log = logging.getLogger("modelpress.runner")
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"
PROGRESS_WRITE_INTERVAL_S = 0.5
# what run_job returns besides a job's final status: the job was not ours to run, or our attempt was taken over
SKIPPED, FENCED = "skipped", "fenced"


def claim_job(job_id: str) -> int | None:
    """Move a queued job to running; returns the attempt number, or None when it is not ours to run."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED or job.cancel_requested:
            return None
        return job_states.claim(session, job, worker_name=WORKER_NAME, lease_seconds=settings.lease_seconds)


def finish_failed(job_id: str, attempt: int, error: dict[str, str]) -> None:
    def write() -> None:
        with session_scope() as session:
            job_states.fail(session, job_id, attempt, error)

    with_database_retry(write, f"job {job_id} failure")


def _finish_cancelled(job_id: str, attempt: int) -> None:
    def write() -> None:
        with session_scope() as session:
            job_states.end_cancelled(session, job_id, attempt)

    with_database_retry(write, f"job {job_id} cancellation")


def _model_ref(model: StoredModel, folder: Path) -> dict[str, Any]:
    path = folder / f"{model.id}.{model.format}"
    get_store().fetch_to(model.storage_key, path)
    return {"path": str(path), "format": model.format, "architecture": model.architecture}


def _dataset_path(dataset_id: str | None, folder: Path) -> str | None:
    if not dataset_id:
        return None
    with session_scope() as session:
        dataset = session.get(StoredDataset, dataset_id)
        assert dataset is not None
        key, fmt = dataset.storage_key, dataset.format
    path = folder / f"{dataset_id}.{fmt}"
    get_store().fetch_to(key, path)
    return str(path)


class JobMonitor:
    """Parent-side bookkeeping while the child runs: progress, events, heartbeats, cancellation."""

    def __init__(self, job_id: str, attempt: int) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.settings = get_settings()
        self.pending_progress: tuple[float, str] | None = None
        self.pending_events: list[tuple[str, dict[str, Any]]] = []
        self.last_write = 0.0
        self.cancelled = self.fenced = False
        self.outage_started: float | None = None

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "progress":
            self.pending_progress = (float(message["fraction"]), str(message["stage"])[:200])
        elif message.get("type") == "event":
            self.pending_events.append((str(message["kind"])[:32], message.get("data") or {}))
        if time.monotonic() - self.last_write > PROGRESS_WRITE_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write pending progress and events and renew the lease; an unreachable database is waited out.

        While the database is down the pending writes stay queued here and the child keeps running; the lease
        is renewed as soon as the database answers again, so an outage shorter than the lease costs nothing.
        """
        self.last_write = time.monotonic()
        try:
            self._write()
        except Exception as error:
            if not _is_connection_problem(error):
                raise
            if self.outage_started is None:
                self.outage_started = time.monotonic()
                log.warning(
                    "database unavailable during job %s; keeping progress until it is back: %s",
                    self.job_id,
                    str(error).splitlines()[0][:200],
                )
            if time.monotonic() - self.outage_started > self.settings.database_outage_tolerance_s:
                raise
            return
        self.outage_started = None

    def _write(self) -> None:
        progress, events = self.pending_progress, list(self.pending_events)
        with session_scope() as session:
            values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=self.settings.lease_seconds)}
            if progress:
                values["progress"], values["stage"] = progress
            if not jobs_repo.update_running(session, job_id=self.job_id, attempt=self.attempt, values=values):
                self.fenced = True
                return
            if progress:
                session.add(
                    JobEvent(
                        job_id=self.job_id,
                        kind="progress",
                        data={"progress": values["progress"], "stage": values["stage"]},
                    )
                )
            for kind, data in events:
                session.add(JobEvent(job_id=self.job_id, kind=kind, data=data))
            cancelled = jobs_repo.cancel_requested(session, job_id=self.job_id)
        # only now committed: forget what was written (messages that arrived meanwhile stay pending)
        self.cancelled = cancelled
        if self.pending_progress == progress:
            self.pending_progress = None
        self.pending_events = self.pending_events[len(events) :]

    def should_stop(self) -> bool:
        self.flush()  # doubles as the heartbeat
        return self.cancelled or self.fenced


def run_job(job_id: str) -> str:
    """The whole job; returns its final status (or 'skipped' when it was not ours to run)."""
    attempt = claim_job(job_id)
    if attempt is None:
        return SKIPPED
    settings = get_settings()
    try:
        status = _run_claimed(job_id, attempt)
    except SoftTimeLimitExceeded:  # the sandboxed child is already killed (run_sandboxed's finally)
        log.warning("job %s ran past its time limit", job_id)
        finish_failed(
            job_id,
            attempt,
            {
                "error": "TimeLimitExceeded",
                "detail": f"the job ran past its {settings.job_soft_time_limit_s} s limit; its process was stopped",
            },
        )
        status = JobStatus.FAILED
    except Exception as error:  # the worker lives on; the job says what happened
        log.exception("job %s failed", job_id)
        finish_failed(job_id, attempt, failure(type(error).__name__, str(error)))
        status = JobStatus.FAILED
    if status in TERMINAL:
        notify_webhook(job_id)
    return status


WEBHOOK_ATTEMPTS = 3


def notify_webhook(job_id: str) -> None:
    """POST the finished job's summary to its webhook_url, with a few retries; the outcome is an event."""
    from app.webhooks import deliver

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.spec.get("webhook_url"):
            return
        url = job.spec["webhook_url"]
        metrics = session.get(JobMetrics, job_id)
        body = {
            "id": job.id,
            "status": job.status,
            "error": job.error,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "compression_ratio": metrics.compression_ratio if metrics else None,
            "speedup": metrics.speedup if metrics else None,
            "speed_verdict": (metrics.document or {}).get("speed_verdict") if metrics else None,
        }
    outcome: dict[str, Any] = {"url": url}
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        # the SSRF guard: resolves the host, refuses internal addresses, pins the vetted one
        delivery = deliver(url, body, timeout=5.0)
        outcome["attempts"] = attempt
        if delivery.refused is not None:
            outcome["refused"] = delivery.refused
            break
        if delivery.status_code is not None:
            outcome["status_code"] = delivery.status_code
            if delivery.status_code < 500:
                break
        else:
            outcome["error"] = delivery.error
        time.sleep(0.5 * 2**attempt)
    with session_scope() as session:
        session.add(JobEvent(job_id=job_id, kind="webhook", data=outcome))


def _run_claimed(job_id: str, attempt: int) -> str:
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        threads = job.spec.get("target", {}).get("threads", settings.worker_threads)
    with sandbox_slot(f"{job_id}-{attempt}", slot_limits(threads)) as (scratch, warm):
        # which child serves the job (host pid) and in which folder: one job per child and folder, checkable
        log.info(
            "job %s attempt %s runs in a %s sandbox, folder %s, pid %s",
            job_id,
            attempt,
            "warm" if warm else "cold",
            scratch.name,
            warm.child.pid if warm else "started for it",
        )
        return _run_in_slot(job_id, attempt, scratch, warm)


def _run_in_slot(job_id: str, attempt: int, scratch: Path, warm: WarmSandbox | None) -> str:
    settings = get_settings()
    inputs = scratch / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spec, tenant_id = dict(job.spec), job.tenant_id
        model = session.get(StoredModel, job.model_id)
        assert model is not None
        model_ref = _model_ref(model, inputs)
        extra = {}
        for extra_id in spec.get("extra_model_ids", []):
            extra_model = session.get(StoredModel, extra_id)
            assert extra_model is not None
            extra[extra_id] = _model_ref(extra_model, inputs)
    artifact_path = scratch / "artifact.bin"
    request = {
        "model": model_ref,
        "stages": [
            {
                "method": s["method"],
                "scheme": s["scheme"],
                "options": {k: v for k, v in s.items() if k not in ("method", "scheme")},
            }
            for s in spec["stages"]
        ],
        "artifact_path": str(artifact_path),
        "example_input_shape": spec.get("example_input_shape"),
        "dataset_path": _dataset_path(spec.get("dataset_id"), inputs),
        "eval_dataset_path": _dataset_path(spec.get("eval_dataset_id"), inputs),
        "device": spec.get("target", {}).get("device", "cpu"),
        "output_format": spec.get("output_format"),
        "extra_models": extra,
        "seed": spec.get("seed", 0),
        "threads": spec.get("target", {}).get("threads", settings.worker_threads),
        "runtime": spec.get("target", {}).get("runtime", "torch"),
        "inputs": spec.get("inputs"),
        "forward_kwargs": spec.get("forward_kwargs"),
        "output": spec.get("output"),
    }
    monitor = JobMonitor(job_id, attempt)
    outcome = run_sandboxed(
        "job",
        request,
        scratch,
        slot_limits(request["threads"]),
        on_message=monitor.on_message,
        should_stop=monitor.should_stop,
        isolation=settings.sandbox_isolation,
        warm=warm,
    )
    # the child is gone: start the next job's sandbox now, so its start overlaps storing this job's result
    # (and the worker is ready for its next message sooner); it gets a folder of its own, never this one
    prestart_sandbox()
    if outcome.stopped:
        if monitor.fenced:
            log.warning("job %s attempt %s was taken over; dropping its result", job_id, attempt)
            return FENCED
        _finish_cancelled(job_id, attempt)
        return JobStatus.CANCELLED
    if not outcome.ok:
        finish_failed(job_id, attempt, outcome.error or {"error": "Unknown", "detail": "no result"})
        return JobStatus.FAILED
    with_database_retry(monitor._write, f"job {job_id} progress")
    assert outcome.result is not None
    return _store_result(job_id, attempt, tenant_id, artifact_path, outcome.result)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _store_result(job_id: str, attempt: int, tenant_id: str, artifact_path: Path, result: dict[str, Any]) -> str:
    artifact_format = result["artifact_format"]
    key = f"artifacts/{tenant_id}/{job_id}/attempt-{attempt}.{extension_of(artifact_format)}"
    size = artifact_path.stat().st_size
    digest = _sha256(artifact_path)
    metrics = result["metrics"]
    if metrics["compressed"]["size_bytes"] != size:
        raise RuntimeError("artifact size changed between measurement and storage")
    store = get_store()
    store.put_file(key, artifact_path)

    def record() -> str:
        with session_scope() as session:
            fidelity = metrics.get("fidelity") or {}
            if not job_states.succeed(session, job_id, attempt):
                return FENCED
            session.add(
                Artifact(
                    job_id=job_id,
                    tenant_id=tenant_id,
                    storage_key=key,
                    size_bytes=size,
                    sha256=digest,
                    format=artifact_format,
                    requires=result.get("requires", []),
                )
            )
            session.add(
                JobMetrics(
                    job_id=job_id,
                    original_size_bytes=metrics["original"]["size_bytes"],
                    compressed_size_bytes=size,
                    compression_ratio=metrics["compression_ratio"],
                    speedup=metrics.get("speedup"),
                    original_accuracy=metrics["original"].get("accuracy"),
                    compressed_accuracy=metrics["compressed"].get("accuracy"),
                    sparsity=metrics["compressed"].get("sparsity"),
                    sqnr_db=fidelity.get("sqnr_db"),
                    top1_agreement=fidelity.get("top1_agreement"),
                    latency_ms_p50=metrics["compressed"].get("latency_ms_p50"),
                    device=metrics.get("device", "cpu"),
                    document=metrics,
                )
            )
        return JobStatus.SUCCEEDED

    # the final write waits for the database: the artifact is already stored and the work is done
    try:
        status = with_database_retry(record, f"job {job_id} result")
    except Exception:
        store.delete(key)
        raise
    if status == FENCED:
        store.delete(key)
    return status


def inspect_model(model_id: str) -> str:
    """Inspect an upload in the sandbox and mark it ready or rejected."""
    settings = get_settings()
    limits = slot_limits(wall_seconds=300)
    with session_scope() as session:
        model = session.get(StoredModel, model_id)
        if model is None or model.status != "pending":
            return "skipped"
    with sandbox_slot(f"inspect-{model_id}", limits) as (scratch, warm):
        with session_scope() as session:
            model = session.get(StoredModel, model_id)
            if model is None:
                return "gone"
            # declared inputs let inspection run the model and try the TorchScript -> exported program conversion
            ref = dict(_model_ref(model, scratch), inputs=model.inputs)
            declared_inputs, constants = model.inputs, model.forward_kwargs
        outcome = run_sandboxed("inspect", ref, scratch, limits, isolation=settings.sandbox_isolation, warm=warm)

    if outcome.ok and outcome.result is not None and settings.upload_trials:
        # each main scheme tried on the upload, so that the API refuses at submit what would fail
        outcome.result["scheme_trials"] = _try_schemes(model_id, declared_inputs, constants, outcome.result)

    def record() -> str:
        with session_scope() as session:
            model = session.get(StoredModel, model_id)
            if model is None:
                return "gone"
            if outcome.ok:
                model.status, model.inspection = "ready", outcome.result
                # a Hugging Face folder's config says what its forward takes (token ids, mask, images)
                declared = (outcome.result or {}).get("declared_inputs")
                if model.inputs is None and declared:
                    model.inputs = declared
            else:
                model.status = "rejected"
                model.inspection = {"error": (outcome.error or {}).get("detail", "could not be loaded")}
            return str(model.status)

    return with_database_retry(record, f"model {model_id} inspection")


def _try_schemes(
    model_id: str, declared_inputs: Any, constants: dict[str, Any] | None, inspection: dict[str, Any]
) -> dict[str, Any]:
    from worker.upload_trials import try_schemes

    def fetch(folder: Path) -> dict[str, Any]:
        with session_scope() as session:
            model = session.get(StoredModel, model_id)
            assert model is not None
            return _model_ref(model, folder)

    try:
        isolation = get_settings().sandbox_isolation
        return try_schemes(model_id, fetch, declared_inputs, inspection, isolation, forward_kwargs=constants)
    except Exception as error:  # the model is still usable: its jobs run and explain their own failures
        log.exception("model %s: scheme trials failed", model_id)
        return {"skipped": f"the trials could not run ({type(error).__name__}: {str(error)[:300]})"}
