"""Checkpoints as the libraries save them, through the service: a torchvision state_dict named
`torchvision.resnet18`, a Hugging Face save_pretrained folder zipped, a hostile tar.

Upload -> sandboxed inspection -> job in a real worker process -> download -> load as the
README says -> the test's own measurement against the reported one.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.test_library_checkpoints import require, tiny_bert_folder, zip_folder
from tests.helpers import npz_bytes, sqnr_db, wait_for
from tests.service.conftest import Api
from tests.service.test_end_to_end import Service, embedded  # noqa: F401  # the fixture


def _wait_inspected(service: Service, model_id: str) -> dict:
    def inspected() -> dict | None:
        model = service.client.get(f"/v1/models/{model_id}", headers=service.headers).json()
        return model if model["status"] != "pending" else None

    return wait_for(inspected, 180, f"inspection of {model_id}")


def _upload(service: Service, name: str, blob: bytes, **data: str) -> dict:
    response = service.client.post("/v1/models", headers=service.headers, files={"file": (name, blob)}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.slow
def test_torchvision_state_dict_by_name_static_int8(embedded: Service) -> None:  # noqa: F811
    require("torchvision")
    from worker.compression.torchvision_ops import import_torchvision

    torch.manual_seed(0)
    model = import_torchvision().models.resnet18(num_classes=10).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    architecture = {"name": "torchvision.resnet18", "kwargs": {"num_classes": 10}}
    uploaded = _upload(embedded, "resnet18.pt", buffer.getvalue(), architecture=json.dumps(architecture))
    assert uploaded["format"] == "state_dict" and uploaded["architecture"] == architecture
    images = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    dataset = embedded.client.post(
        "/v1/datasets", headers=embedded.headers, files={"file": ("images.npz", npz_bytes(inputs=images))}
    ).json()
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "dataset_id": dataset["id"],
                "stages": [{"method": "quantize", "scheme": "static_int8"}],
                "example_input_shape": [1, 3, 32, 32],
                "output_format": "torchscript",
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    quantized = torch.jit.load(io.BytesIO(blob))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        measured = sqnr_db(model(x), quantized(x))
    assert measured >= 20, measured
    assert len(blob) == job["metrics"]["compressed"]["size_bytes"]
    assert len(buffer.getvalue()) / len(blob) >= 3


@pytest.mark.slow
def test_hf_folder_zip_needs_no_inputs_spec_and_a_hostile_tar_is_rejected(
    embedded: Service,  # noqa: F811
    tmp_path: Path,
) -> None:
    model = tiny_bert_folder(tmp_path / "saved")
    archive = zip_folder(tmp_path / "saved", tmp_path / "bert.zip")
    uploaded = _upload(embedded, "bert.zip", archive.read_bytes())
    assert uploaded["format"] == "huggingface"
    ready = _wait_inspected(embedded, uploaded["id"])
    assert ready["status"] == "ready", ready["inspection"]
    assert ready["inspection"]["model_class"] == "BertForSequenceClassification"
    assert [i["name"] for i in ready["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert ready["inputs"][0]["high"] == model.config.vocab_size
    # no inputs, no example_input_shape: the job takes those declared from config.json
    job = embedded.wait(
        embedded.submit(
            {
                "model_id": uploaded["id"],
                "stages": [{"method": "quantize", "scheme": "dynamic_int8"}],
                "output": "logits",
                "output_format": "torchscript",
            }
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    blob = embedded.client.get(f"/v1/jobs/{job['id']}/artifact", headers=embedded.headers).content
    quantized = torch.jit.load(io.BytesIO(blob))
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=generator)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        output = quantized(ids, mask, types)
    logits = output["logits"] if isinstance(output, dict) else output[0]
    measured = sqnr_db(reference, logits)
    assert measured >= 25, measured
    assert len(blob) == job["metrics"]["compressed"]["size_bytes"] < len(archive.read_bytes())

    # a tar whose config.json is a link out of the folder: accepted as bytes, refused where it is unpacked
    hostile = io.BytesIO()
    with tarfile.open(fileobj=hostile, mode="w") as handle:
        link = tarfile.TarInfo("config.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        handle.addfile(link)
    rejected = _wait_inspected(embedded, _upload(embedded, "evil.tar", hostile.getvalue())["id"])
    assert rejected["status"] == "rejected" and "is a link" in rejected["inspection"]["error"]
    refused = embedded.client.post(
        "/v1/jobs",
        headers=embedded.headers,
        json={"model_id": rejected["id"], "stages": [{"method": "quantize", "scheme": "dynamic_int8"}]},
    )
    assert refused.status_code == 422 and "is a link" in refused.json()["detail"]


@pytest.mark.postgres
def test_upload_checks_library_names_and_archive_paths(api: Api, tmp_path: Path) -> None:
    def post(name: str, blob: bytes, **data: str):  # type: ignore[no-untyped-def]
        return api.client.post("/v1/models", headers=api.headers(), files={"file": (name, blob)}, data=data)

    weights = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, weights)
    accepted = post("w.pt", weights.getvalue(), architecture=json.dumps({"name": "timm.vit_tiny_patch16_224"}))
    assert accepted.status_code == 201, accepted.text
    as_library = post(
        "w.pt", weights.getvalue(), architecture=json.dumps({"library": "torchvision", "name": "resnet18"})
    )
    assert as_library.status_code == 201 and as_library.json()["architecture"]["name"] == "torchvision.resnet18"
    no_config = post(
        "w.pt", weights.getvalue(), architecture=json.dumps({"library": "transformers", "name": "AutoModel"})
    )
    assert no_config.status_code == 422 and '"config"' in no_config.json()["detail"]
    for name in ("torchvision.os.system", "torchvision.", "keras.resnet"):
        refused = post("w.pt", weights.getvalue(), architecture=json.dumps({"name": name}))
        assert refused.status_code == 422 and "unknown architecture" in refused.json()["detail"], name
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as handle:
        handle.writestr("model/config.json", "{}")
        handle.writestr("../outside.json", "{}")
    refused = post("m.zip", escaping.getvalue())
    assert refused.status_code == 422 and "unsafe path" in refused.json()["detail"]
    folder = io.BytesIO()
    with zipfile.ZipFile(folder, "w") as handle:
        handle.writestr("model/config.json", "{}")
    both = post("m.zip", folder.getvalue(), architecture=json.dumps({"name": "mlp"}))
    assert both.status_code == 422 and "send no architecture" in both.json()["detail"]
    sniffed = post("m.zip", folder.getvalue())
    assert sniffed.status_code == 201 and sniffed.json()["format"] == "huggingface"
