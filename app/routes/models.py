"""HTTP only: models and datasets."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app import resources
from app.deps import SessionDep, TenantDep
from app.outbox import publish_now
from app.repositories.owned import newest
from app.schemas import DatasetList, DatasetRead, ErrorBody, ModelList, ModelRead
from app.storage import get_store
from app.tables import StoredDataset, StoredModel
from app.uploads import receive_upload

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 413, 422, 429)}
router = APIRouter(prefix="/v1", responses=ERRORS)


@router.post(
    "/models",
    status_code=201,
    response_model=ModelRead,
    summary="Upload a model",
    description="Multipart upload. `format` is detected when absent; weight-only formats "
    "(state_dict, safetensors) need `architecture` JSON naming a registered architecture.",
)
def upload_model(
    session: SessionDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File()],
    name: Annotated[str | None, Form()] = None,
    format: Annotated[str | None, Form()] = None,
    architecture: Annotated[str | None, Form()] = None,
    inputs: Annotated[str | None, Form(description="JSON list of the forward's inputs (API.md)")] = None,
    forward_kwargs: Annotated[
        str | None, Form(description='JSON object of constant non-tensor arguments of forward, e.g. {"sr": 16000}')
    ] = None,
) -> StoredModel:
    declared_inputs = resources.parse_inputs(inputs)  # before the upload is read: a bad one costs nothing
    constants = resources.parse_forward_kwargs(forward_kwargs, declared_inputs)
    with receive_upload(file) as received:
        record, inspection = resources.create_model(
            session,
            tenant=tenant,
            upload=received,
            name=name,
            declared_format=format,
            architecture_json=architecture,
            inputs=declared_inputs,
            forward_kwargs=constants,
        )
        session.commit()
    publish_now(inspection)  # after the commit, as for jobs; the relay retries a failed publish
    return record


@router.get("/models", response_model=ModelList, summary="List models")
def list_models(
    session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> dict[str, Any]:
    items = newest(session, StoredModel, tenant_id=tenant.id, limit=limit)
    return {"items": items, "next_cursor": None}


@router.get("/models/{model_id}", response_model=ModelRead, summary="Get a model")
def read_model(model_id: str, session: SessionDep, tenant: TenantDep) -> StoredModel:
    return resources.get_model(session, tenant, model_id)


@router.get("/models/{model_id}/download", summary="Download the uploaded model file", response_class=StreamingResponse)
def download_model(model_id: str, session: SessionDep, tenant: TenantDep) -> StreamingResponse:
    record = resources.get_model(session, tenant, model_id)
    session.commit()  # no transaction stays open while the file streams
    return StreamingResponse(
        get_store().iter_bytes(record.storage_key),
        media_type="application/octet-stream",
        headers={
            "ETag": f'"{record.sha256}"',
            "Content-Length": str(record.size_bytes),
            "Content-Disposition": f'attachment; filename="{record.id}"',
        },
    )


@router.delete("/models/{model_id}", status_code=204, summary="Delete a model")
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep) -> None:
    resources.delete_model(session, tenant, model_id)


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetRead,
    summary="Upload a dataset",
    description="`.npz` (no pickles) or `.safetensors` with `inputs` and optional `labels`.",
)
def upload_dataset(
    session: SessionDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File()],
    name: Annotated[str | None, Form()] = None,
) -> StoredDataset:
    with receive_upload(file) as received:
        record = resources.create_dataset(session, tenant=tenant, upload=received, name=name)
        session.commit()
    return record


@router.get("/datasets", response_model=DatasetList, summary="List datasets")
def list_datasets(
    session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> dict[str, Any]:
    items = newest(session, StoredDataset, tenant_id=tenant.id, limit=limit)
    return {"items": items, "next_cursor": None}


@router.get("/datasets/{dataset_id}", response_model=DatasetRead, summary="Get a dataset")
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> StoredDataset:
    return resources.get_dataset(session, tenant, dataset_id)


@router.delete("/datasets/{dataset_id}", status_code=204, summary="Delete a dataset")
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> None:
    resources.delete_dataset(session, tenant, dataset_id)
