"""Rules for models and datasets: store the file, record it, never leave half of it behind."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import Conflict, Invalid, QuotaExceeded
from app.outbox import enqueue
from app.queue import INSPECT_MODEL
from app.repositories import jobs as jobs_repo
from app.repositories.owned import get_owned, stored_bytes
from app.storage import get_store
from app.tables import StoredDataset, StoredModel, Tenant, new_id
from app.uploads import ReceivedFile
from modelpress.architectures import architecture_names, is_known_architecture, normalise_architecture
from modelpress.catalog import MODEL_FORMATS
from modelpress.formats import FormatError, check_model_file, sniff_dataset, sniff_model_format


def _check_storage_quota(session: Session, tenant: Tenant, incoming: int) -> None:
    limit = get_settings().max_stored_bytes_per_tenant
    if stored_bytes(session, tenant_id=tenant.id) + incoming > limit:
        raise QuotaExceeded(f"tenant storage quota of {limit} bytes would be exceeded; delete models or datasets")


def parse_architecture(raw: str | None) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise Invalid(f'architecture must be JSON like {{"name": "mlp", "kwargs": {{...}}}}: {error}') from error
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise Invalid('architecture must be an object with a "name" from the registry')
    if not isinstance(value.get("kwargs", {}), dict) or not isinstance(value.get("config", {}), dict):
        raise Invalid("architecture.kwargs and architecture.config must be objects")
    try:
        value = normalise_architecture(value)
    except ValueError as error:
        raise Invalid(str(error)) from error
    if value["name"].startswith("transformers.") and not isinstance(value["kwargs"].get("config"), dict):
        raise Invalid('a transformers architecture needs "config": the model\'s config.json as an object')
    if not is_known_architecture(value["name"]):
        raise Invalid(
            f"unknown architecture {value['name']!r}; registered: {architecture_names()}, "
            'or a library model as "torchvision.<model>" / "timm.<model>" / "transformers.<class>"'
        )
    return {"name": value["name"], "kwargs": value.get("kwargs", {})}


def _store_and_record(session: Session, upload: ReceivedFile, record: StoredModel | StoredDataset) -> None:
    """Put the file in storage, then its row in the session; a failed insert takes the file back out."""
    store = get_store()
    store.put_file(record.storage_key, upload.path)
    try:
        session.add(record)
        session.flush()
    except BaseException:
        store.delete(record.storage_key)
        raise


def parse_inputs(inputs_json: str | None) -> list[dict[str, Any]] | None:
    """The `inputs` form field of a model upload, checked as a job's `inputs` are."""
    if inputs_json is None or not inputs_json.strip():
        return None
    from pydantic import TypeAdapter, ValidationError

    from app.schemas import InputDecl
    from modelpress.catalog import SpecError, validate_forward_call

    if len(inputs_json) > 64 * 1024:
        raise Invalid("inputs: at most 64 KiB of JSON")
    try:
        declared = TypeAdapter(list[InputDecl]).validate_json(inputs_json)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise Invalid(f"inputs[{where}]: {problem['msg']}" if where else f"inputs: {problem['msg']}") from None
    if not 1 <= len(declared) <= 16:
        raise Invalid("inputs must list 1 to 16 inputs")
    as_dicts = [item.model_dump() for item in declared]
    try:
        validate_forward_call(as_dicts, None, None)
    except SpecError as error:
        raise Invalid(str(error)) from None
    return as_dicts


def parse_forward_kwargs(kwargs_json: str | None, inputs: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The `forward_kwargs` form field of a model upload, checked as a job's are."""
    if kwargs_json is None or not kwargs_json.strip():
        return None
    from modelpress.catalog import SpecError, validate_forward_call

    if len(kwargs_json) > 16 * 1024:
        raise Invalid("forward_kwargs: at most 16 KiB of JSON")
    try:
        constants = json.loads(kwargs_json)
    except ValueError:
        raise Invalid("forward_kwargs must be a JSON object") from None
    if not isinstance(constants, dict):
        raise Invalid("forward_kwargs must be a JSON object")
    try:
        validate_forward_call(inputs, constants, None)
    except SpecError as error:
        raise Invalid(str(error)) from None
    return constants or None


def create_model(
    session: Session,
    *,
    tenant: Tenant,
    upload: ReceivedFile,
    name: str | None,
    declared_format: str | None,
    architecture_json: str | None,
    inputs: list[dict[str, Any]] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> tuple[StoredModel, int]:
    """Store and record an upload; returns it and the outbox message of its sandboxed inspection."""
    settings = get_settings()
    if declared_format is not None and declared_format not in MODEL_FORMATS:
        raise Invalid(f"format must be one of {list(MODEL_FORMATS)}")
    try:
        if declared_format:
            check_model_file(upload.path, declared_format, settings.max_archive_unpacked_bytes)
            model_format = declared_format
        else:
            model_format = sniff_model_format(upload.path, settings.max_archive_unpacked_bytes)
    except FormatError as error:
        raise Invalid(f"not an accepted model file: {error}") from error
    architecture = parse_architecture(architecture_json)
    if model_format == "huggingface" and architecture is not None:
        raise Invalid("a huggingface folder is built from its config.json; send no architecture")
    if model_format in ("state_dict", "safetensors") and architecture is None:
        raise Invalid(
            f"a {model_format} upload holds weights only: send an architecture "
            f"from the registry ({architecture_names()})"
        )
    _check_storage_quota(session, tenant, upload.size_bytes)
    model_id = new_id("mdl")
    key = f"models/{tenant.id}/{model_id}"
    record = StoredModel(
        id=model_id,
        tenant_id=tenant.id,
        name=name or upload.filename,
        format=model_format,
        architecture=architecture,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        storage_key=key,
        status="pending",
        inputs=inputs,
        forward_kwargs=forward_kwargs,
    )
    _store_and_record(session, upload, record)
    message = enqueue(session, task=INSPECT_MODEL, object_id=model_id)
    return record, message.id


def get_model(session: Session, tenant: Tenant, model_id: str) -> StoredModel:
    return get_owned(session, StoredModel, tenant_id=tenant.id, object_id=model_id, label="model")


def delete_model(session: Session, tenant: Tenant, model_id: str) -> None:
    record = get_model(session, tenant, model_id)
    active = jobs_repo.count_active(session, model_id=model_id)
    if active:
        raise Conflict(f"model {model_id} has {active} queued or running jobs")
    # its finished jobs go with it (the foreign key cascades); so do their artifact files
    artifact_keys = jobs_repo.artifact_keys_of_model(session, model_id=model_id)
    key = record.storage_key
    session.delete(record)
    session.flush()
    store = get_store()
    for stored in [key, *artifact_keys]:
        store.delete(stored)


def create_dataset(session: Session, *, tenant: Tenant, upload: ReceivedFile, name: str | None) -> StoredDataset:
    settings = get_settings()
    try:
        info = sniff_dataset(upload.path, settings.max_archive_unpacked_bytes)
    except FormatError as error:
        raise Invalid(f"not an accepted dataset file: {error}") from error
    _check_storage_quota(session, tenant, upload.size_bytes)
    dataset_id = new_id("ds")
    key = f"datasets/{tenant.id}/{dataset_id}"
    record = StoredDataset(
        id=dataset_id,
        tenant_id=tenant.id,
        name=name or upload.filename,
        format=info["format"],
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        storage_key=key,
        info=info,
    )
    _store_and_record(session, upload, record)
    return record


def get_dataset(session: Session, tenant: Tenant, dataset_id: str) -> StoredDataset:
    return get_owned(session, StoredDataset, tenant_id=tenant.id, object_id=dataset_id, label="dataset")


def delete_dataset(session: Session, tenant: Tenant, dataset_id: str) -> None:
    record = get_dataset(session, tenant, dataset_id)
    key = record.storage_key
    session.delete(record)
    session.flush()
    get_store().delete(key)
