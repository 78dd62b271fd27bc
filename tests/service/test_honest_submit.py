"""Issue 20: what the API knows at submit it says at submit (422), not 10 s later in the worker."""

from __future__ import annotations

import numpy as np

from tests.helpers import npz_bytes
from tests.service.conftest import Api
from tests.service.test_api import assert_error, upload_ts


def test_schemes_that_fine_tune_refuse_an_unlabelled_dataset_at_submit(api: Api) -> None:
    model = upload_ts(api)
    response = api.client.post(
        "/v1/datasets",
        headers=api.headers(),
        files={"file": ("unlabelled.npz", npz_bytes(np.zeros((6, 8), np.float32)))},
    )
    assert response.status_code == 201, response.text
    unlabelled = response.json()["id"]
    for body in (
        {"preset": "deep-compression"},
        {
            "stages": [
                {
                    "method": "prune",
                    "scheme": "l1_unstructured",
                    "amount": 0.5,
                    "schedule": {"steps": 2, "finetune_epochs": 1},
                }
            ]
        },
    ):
        refused = api.client.post(
            "/v1/jobs",
            headers=api.headers(),
            json={"model_id": model["id"], "dataset_id": unlabelled, "example_input_shape": [1, 8], **body},
        )
        assert "labels" in assert_error(refused, 422)["detail"]
    # the same request without the fine-tuning is accepted: the refusal is about labels, nothing else
    accepted = api.client.post(
        "/v1/jobs",
        headers=api.headers(),
        json={
            "model_id": model["id"],
            "dataset_id": unlabelled,
            "example_input_shape": [1, 8],
            "stages": [{"method": "prune", "scheme": "l1_unstructured", "amount": 0.5}],
        },
    )
    assert accepted.status_code == 202, accepted.text
