"""The search method's scheme (worker/compression/search.py)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from modelpress.configs.base import MaxAccuracyDrop, MinSqnrDb, StageConfig, Train
from modelpress.options import SearchCandidates


class AccuracyAwareConfig(StageConfig):
    method: Literal["search"] = "search"
    scheme: Literal["accuracy_aware"] = "accuracy_aware"
    summary: ClassVar[str] = (
        "the smallest (or fastest) model that meets an accuracy or fidelity bar, over recipes and amounts"
    )
    library: ClassVar[str] = "ModelPress search over the other methods"

    max_accuracy_drop: Annotated[
        MaxAccuracyDrop | None,
        Field(description="absolute top-1 drop allowed; needs an eval dataset with labels"),
    ] = None
    min_sqnr_db: Annotated[MinSqnrDb | None, Field(description="fidelity bar; no labels needed")] = None
    objective: Annotated[Literal["size", "latency"], Field(description="what the search minimises")] = "size"
    candidates: Annotated[
        SearchCandidates | None,
        Field(description='{"recipes": [[stage, ...], ...], "amount": {"min": 0.3, "max": 0.95}}'),
    ] = None
    max_trials: Annotated[int, Field(ge=1, le=200, description="candidates tried at most")] = 12
    time_budget_s: Annotated[
        float, Field(ge=1.0, le=86400.0, description="no further trial starts once one more would pass this")
    ] = 1800.0
    train: Train = None


SEARCH_CONFIGS: tuple[type[StageConfig], ...] = (AccuracyAwareConfig,)
