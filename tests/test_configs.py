"""The typed stage configs (modelpress.configs): one place for every option's default and bounds (no torch)."""

from __future__ import annotations

import pytest

from modelpress.catalog import PRESETS, SCHEMES, JobFacts, SpecError, expand_preset, validate_stages
from modelpress.configs import (
    STAGE_ADAPTER,
    STAGE_CONFIGS,
    HintonConfig,
    L1UnstructuredConfig,
    NmSemiStructuredConfig,
    parse_stage,
)


def test_a_schemes_defaults_come_from_its_config() -> None:
    # a stage that gives no option gets exactly the config's field defaults, and the catalogue publishes them
    for spec in SCHEMES:
        config = spec.config
        parsed = parse_stage({"method": spec.method, "scheme": spec.name})
        assert type(parsed) is config
        for option in spec.options:
            field_default = config.model_fields[option.name].get_default(call_default_factory=True)
            assert option.default == field_default, (spec.name, option.name)
            assert getattr(parsed, option.name) == field_default
    assert L1UnstructuredConfig().amount == 0.5
    assert validate_stages([{"method": "prune", "scheme": "l1_unstructured"}], JobFacts("state_dict"))[0].options == {
        "amount": 0.5,
        "layers": None,
        "prune_classifier": False,
        "schedule": None,
        "train": None,
    }


def test_the_union_picks_the_config_by_method_and_scheme_and_the_default_scheme() -> None:
    assert type(STAGE_ADAPTER.validate_python({"method": "distill"})) is HintonConfig
    assert type(STAGE_ADAPTER.validate_python({"method": "prune", "scheme": "nm_semi_structured"})) is (
        NmSemiStructuredConfig
    )
    assert len({config.tag() for config in STAGE_CONFIGS}) == len(STAGE_CONFIGS) == len(SCHEMES)
    for name in PRESETS:
        stages = [parse_stage(stage) for stage in expand_preset(name)]
        assert [stage.as_stage() | original for stage, original in zip(stages, expand_preset(name))] == [
            stage.as_stage() for stage in stages
        ]


def test_configs_are_frozen_and_refuse_unknown_options() -> None:
    config = L1UnstructuredConfig(amount=0.8)
    with pytest.raises(ValueError, match="frozen"):
        config.amount = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError, match="colour"):
        L1UnstructuredConfig(colour="red")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "prune", "scheme": "l1_unstructured", "amount": 1.5}, "stages[0].amount must be < 1.0, got 1.5"),
        ({"method": "prune", "scheme": "l1_unstructured", "amount": True}, "stages[0].amount must be a number"),
        ({"method": "prune", "scheme": "l1_unstructured", "amount": None}, "stages[0].amount must not be null"),
        ({"method": "prune", "scheme": "nm_semi_structured", "n": 0}, "stages[0].n must be >= 1, got 0"),
        ({"method": "prune", "scheme": "l1_unstructured", "train": {"lr": 0}}, "stages[0].train.lr must be > 0.0"),
        ({"method": "distill", "transfer_augmentation": "cutmix"}, "stages[0].transfer_augmentation must be"),
        ({"method": "quantize", "scheme": "dynamic_int8", "skip": []}, "unknown option 'skip' for quantize/dynamic"),
        ({"method": "quantize", "scheme": "int3"}, "unknown scheme 'int3' for method 'quantize'"),
        ({"method": "prune"}, "method 'prune' needs a scheme"),
    ],
)
def test_a_bad_option_is_named_in_the_message(stage: dict, message: str) -> None:
    with pytest.raises(SpecError) as refused:
        validate_stages([stage], JobFacts("state_dict"))
    assert message in str(refused.value)
