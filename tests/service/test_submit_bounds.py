"""Every JobSpec field is bounded at submit: out-of-range values answer 422 naming the field, nothing is stored."""

from __future__ import annotations

import json
import time

import pytest

from app.db import session_scope
from app.tables import WorkerRecord
from tests.service.conftest import Api
from tests.service.test_api import assert_error, counts, upload_ts

pytestmark = pytest.mark.postgres

QUANTIZE = {"method": "quantize", "scheme": "dynamic_int8"}
PRUNE = {"method": "prune", "scheme": "l1_unstructured", "amount": 0.5}


def submit_raw(api: Api, body: dict):  # type: ignore[no-untyped-def]
    """POST with NaN / Infinity written as JSON allows them (Python's json module reads them)."""
    return api.client.post(
        "/v1/jobs",
        headers={**api.headers(), "Content-Type": "application/json"},
        content=json.dumps(body, allow_nan=True),
    )


@pytest.mark.parametrize(
    ("stage", "field"),
    [
        ({**PRUNE, "amount": float("nan")}, "stages[0].amount"),
        ({**PRUNE, "amount": float("inf")}, "stages[0].amount"),
        ({**PRUNE, "amount": None}, "stages[0].amount"),
        ({**PRUNE, "train": {"epochs": -1}}, "stages[0].train.epochs"),
        ({**PRUNE, "train": {"epochs": 10**12}}, "stages[0].train.epochs"),
        ({**PRUNE, "train": {"epochs": 1e12}}, "stages[0].train.epochs"),
        ({**PRUNE, "train": {"lr": float("nan")}}, "stages[0].train.lr"),
        ({**PRUNE, "train": {"lr": 0}}, "stages[0].train.lr"),
        ({**PRUNE, "train": {"lr": 1e9}}, "stages[0].train.lr"),
        ({**PRUNE, "train": {"batch_size": 0}}, "stages[0].train.batch_size"),
        ({**PRUNE, "train": {"batch_size": 10**9}}, "stages[0].train.batch_size"),
        ({**PRUNE, "train": {"devices": 10000}}, "stages[0].train.devices"),
        ({**PRUNE, "train": {"devices": 0}}, "stages[0].train.devices"),
        ({**PRUNE, "train": {"seed": 2**70}}, "stages[0].train.seed"),
        ({**PRUNE, "train": {"colour": "red"}}, "stages[0].train.colour"),
        ({**PRUNE, "train": {"schedule": {"name": "step", "step_size": 0}}}, "stages[0].train.step_size"),
        ({**PRUNE, "schedule": {"steps": 2, "finetune_epochs": -1}}, "stages[0].schedule.finetune_epochs"),
        ({**PRUNE, "schedule": {"steps": 10**6}}, "stages[0].schedule.steps"),
        ({**PRUNE, "layers": {"include": ["x"] * 10_000}}, "stages[0].layers"),
        ({"method": "distill", "scheme": "hinton", "train": {"devices": 10000}}, "stages[0].train.devices"),
        ({"method": "distill", "scheme": "hinton", "temperature": float("inf")}, "stages[0].temperature"),
        ({"method": "prune", "scheme": "ln_structured", "norm": 1e300}, "stages[0].norm"),
    ],
)
def test_bad_stage_options_answer_422_naming_the_field(api: Api, stage: dict, field: str) -> None:
    model = upload_ts(api)
    response = submit_raw(api, {"model_id": model["id"], "stages": [stage], "example_input_shape": [1, 8]})
    assert field in assert_error(response, 422, "InvalidRequest")["detail"]
    assert counts()[2] == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"example_input_shape": [1, 2**80]}, "example_input_shape"),
        ({"example_input_shape": [1, 2**40]}, "example_input_shape"),
        ({"example_input_shape": [4096, 4096, 4096]}, "example_input_shape"),  # each fine, product 2^36
        ({"example_input_shape": [1, 0]}, "example_input_shape"),
        ({"priority": 10}, "priority"),
        ({"model_id": "m" * 10_000}, "model_id"),
        ({"search": {"min_sqnr_db": 20, "candidates": {"recipes": [[QUANTIZE]] * 5000}}}, "search"),
        ({"stages": [QUANTIZE] * 17}, "stages"),
    ],
)
def test_bad_top_level_fields_answer_422_naming_the_field(api: Api, change: dict, field: str) -> None:
    model = upload_ts(api)
    body = {"model_id": model["id"], "stages": [QUANTIZE], "example_input_shape": [1, 8], **change}
    if "search" in change:
        body.pop("stages")
    assert field in assert_error(submit_raw(api, body), 422, "InvalidRequest")["detail"]
    assert counts()[2] == 0


def test_search_recipes_are_validated_like_stages(api: Api) -> None:
    model = upload_ts(api)
    search = {"min_sqnr_db": 20, "candidates": {"recipes": [[{**PRUNE, "amount": 7}]]}}
    response = submit_raw(api, {"model_id": model["id"], "search": search, "example_input_shape": [1, 8]})
    assert "candidates.recipes[0]" in assert_error(response, 422)["detail"]


def test_a_100000_stage_spec_is_refused_quickly(api: Api) -> None:
    model = upload_ts(api)
    body = {"model_id": model["id"], "stages": [QUANTIZE] * 100_000, "example_input_shape": [1, 8]}
    started = time.process_time()
    response = submit_raw(api, body)
    cpu_seconds = time.process_time() - started
    assert "stages" in assert_error(response, 422)["detail"]
    # the client's encoding plus the server's parse and refusal; per-stage validation took 5 s before
    assert cpu_seconds < 2.0, cpu_seconds


def test_train_devices_are_held_to_the_largest_live_worker(api: Api) -> None:
    model = upload_ts(api)
    with session_scope() as session:
        session.add(WorkerRecord(name="w-small", queues=["cpu"], capabilities={"devices": ["cpu"], "cpu_count": 2}))
        session.add(WorkerRecord(name="w-big", queues=["cpu"], capabilities={"devices": ["cpu"], "cpu_count": 4}))
    body = {"model_id": model["id"], "example_input_shape": [1, 8]}
    too_many = submit_raw(api, {**body, "stages": [{**PRUNE, "train": {"devices": 5}}]})
    assert "stages[0].train.devices" in assert_error(too_many, 422)["detail"]
    fits = submit_raw(api, {**body, "stages": [{**PRUNE, "train": {"devices": 4}}]})
    assert fits.status_code == 202, fits.text


def test_in_range_values_are_accepted_unchanged(api: Api) -> None:
    model = upload_ts(api)
    stage = {
        **PRUNE,
        "train": {
            "epochs": 3,
            "lr": 0.01,
            "batch_size": 32,
            "devices": 1,
            "seed": 2**63 - 1,
            "schedule": {"name": "cosine"},
        },
    }
    response = submit_raw(
        api,
        {
            "model_id": model["id"],
            "stages": [stage] + [QUANTIZE] * 15,
            "seed": 2**63 - 1,
            "example_input_shape": [2, 8],
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["stages"][0]["train"] == stage["train"]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {**PRUNE, "colour": "red"},
            "stages[0]: unknown option 'colour' for prune/l1_unstructured; "
            "options: ['amount', 'layers', 'prune_classifier', 'schedule', 'train']",
        ),
        ({**PRUNE, "amount": 1.5}, "stages[0].amount must be < 1.0, got 1.5"),
        ({"method": "encode", "scheme": "codebook", "bits": 9}, "stages[0].bits must be <= 8, got 9"),
        ({"method": "distill", "temperature": 0.01}, "stages[0].temperature must be >= 0.1, got 0.01"),
    ],
)
def test_an_unknown_or_out_of_bounds_option_answers_422_naming_the_field(api: Api, stage: dict, message: str) -> None:
    model = upload_ts(api)
    response = submit_raw(api, {"model_id": model["id"], "stages": [stage], "example_input_shape": [1, 8]})
    assert message in assert_error(response, 422, "InvalidRequest")["detail"]
    assert counts()[2] == 0


def test_methods_carry_each_schemes_json_schema_from_its_config(api: Api) -> None:
    from modelpress.configs import STAGE_CONFIGS

    catalogue = api.client.get("/v1/methods", headers=api.headers()).json()
    assert {"methods", "presets", "output_formats", "runtimes", "model_formats"} <= set(catalogue)
    published = {(s["method"], s["name"]): s for m in catalogue["methods"] for s in m["schemes"]}
    configs = {config.tag(): config for config in STAGE_CONFIGS}
    assert {f"{method}:{name}" for method, name in published} == set(configs)
    for (method, name), scheme in published.items():
        config = configs[f"{method}:{name}"]
        properties = scheme["schema"]["properties"]
        assert set(properties) == {"method", "scheme", *config.option_names()}
        assert scheme["schema"]["additionalProperties"] is False
        for option in scheme["options"]:
            assert option["default"] == config.model_fields[option["name"]].get_default(call_default_factory=True)
            assert option["help"] == properties[option["name"]].get("description", "")
    amount = published[("prune", "l1_unstructured")]["schema"]["properties"]["amount"]
    assert (amount["type"], amount["default"], amount["minimum"], amount["exclusiveMaximum"]) == ("number", 0.5, 0, 1)
    assert amount["description"] == "fraction of weights to remove"
    # the submit endpoint's OpenAPI document lists the same configs, every option with its bounds
    openapi = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert openapi["NmSemiStructuredConfig"]["properties"]["n"]["maximum"] == 16
    assert all(config.__name__ in openapi for config in STAGE_CONFIGS)
