"""Section 1: compression quality on scikit-learn's digits, for every CPU scheme and preset.

Every row is one `pipeline.run_job` (the function the worker's sandboxed child runs) on a
state_dict upload with a registered architecture, the digits training split as the
dataset and the test split as the eval dataset. Size ratio and accuracies are the
service's own metrics; latencies are re-measured here on the downloaded artifact,
loaded the way a user loads it, against the float model at batch 1 and 64.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from bench.common import (
    MODELS,
    Assets,
    Size,
    command_for,
    engine_request,
    fmt,
    load_artifact_module,
    log,
    paired_latency,
    run_engine,
)


def cpu_schemes() -> list[dict[str, Any]]:
    """Every scheme of the catalogue that runs on CPU, in catalogue order (search gets its own row)."""
    from modelpress.catalog import SCHEMES

    return [
        {"method": spec.method, "scheme": spec.name}
        for spec in SCHEMES
        if "cpu" in spec.devices and spec.method != "search"
    ]


PRESETS = ("cpu-int8", "deep-compression", "distill-small")
HAN_REFERENCE = {
    "source": "Han, Mao & Dally, Deep Compression (ICLR 2016), Table 1",
    "model": "LeNet-300-100 on MNIST (784-300-100-10, 267K weights)",
    "ratio": 40.0,
    "error_before": 0.0164,
    "error_after": 0.0158,
    "method": "pruning to 8% of weights + 6-bit weight sharing + Huffman coding",
}


def _shorten_training(stages: list[dict[str, Any]], epochs: int | None) -> list[dict[str, Any]]:
    """At smoke size every training budget shrinks to `epochs` (and schedules to 2 steps)."""
    if epochs is None:
        return stages
    shortened = []
    for stage in stages:
        stage = copy.deepcopy(stage)
        if stage.get("schedule"):
            stage["schedule"] = {"steps": 2, "finetune_epochs": epochs}
        if stage["method"] in ("distill", "search") or stage.get("train"):
            stage["train"] = {**(stage.get("train") or {}), "epochs": epochs}
        shortened.append(stage)
    return shortened


def _label(stages: list[dict[str, Any]]) -> str:
    parts = []
    for stage in stages:
        options = {k: v for k, v in stage.items() if k not in ("method", "scheme", "train")}
        detail = ", ".join(
            f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict) else v}" for k, v in options.items()
        )
        parts.append(f"{stage['method']}:{stage['scheme']}" + (f" ({detail})" if detail else ""))
    return " → ".join(parts)


def _validated_key(stages: list[dict[str, Any]]) -> str:
    from modelpress.catalog import JobFacts, validate_stages

    facts = JobFacts(model_format="state_dict", has_dataset=True, dataset_has_labels=True, eval_has_labels=True)
    return json.dumps(
        [[v.spec.method, v.spec.name, v.options] for v in validate_stages(stages, facts)], sort_keys=True, default=str
    )


def _preset_stages(name: str) -> tuple[list[dict[str, Any]], str | None]:
    """The preset's stages as the API expands them, or a repaired copy and the API's complaint."""
    from modelpress.catalog import SpecError, expand_preset, find_scheme

    stages = expand_preset(name)
    try:
        _validated_key(stages)
        return stages, None
    except SpecError as error:
        repaired = []
        for stage in stages:
            spec = find_scheme(stage["method"], stage.get("scheme"))
            defaults = {o.name: o.default for o in spec.options}
            repaired.append(
                {k: v for k, v in stage.items() if k in ("method", "scheme") or defaults.get(k, object()) != v}
            )
        return repaired, str(error)


def recipes_for(model_name: str, size: Size) -> list[dict[str, Any]]:
    recipes: list[dict[str, Any]] = [
        {"name": f"{s['method']}:{s['scheme']}", "stages": [dict(s)], "kind": "scheme"} for s in cpu_schemes()
    ]
    if model_name == "lenet-300-100" and size.search_trials:
        recipes.append(
            {
                "name": "search:accuracy_aware",
                "kind": "scheme",
                "stages": [
                    {
                        "method": "search",
                        "scheme": "accuracy_aware",
                        "max_accuracy_drop": 0.01,
                        "max_trials": size.search_trials,
                        "time_budget_s": 120.0,
                    }
                ],
            }
        )
    for preset in PRESETS:
        stages, problem = _preset_stages(preset)
        recipes.append({"name": f"preset {preset}", "stages": stages, "kind": "preset", "preset_problem": problem})
    for recipe in recipes:
        recipe["stages"] = _shorten_training(recipe["stages"], size.quality_stage_epochs)
    return recipes


def run(size: Size, assets: Assets) -> dict[str, Any]:
    import torch

    rows: list[dict[str, Any]] = []
    for model_name in size.quality_models:
        model = assets.model(model_name, size.base_epochs)
        architecture = MODELS[model_name]["architecture"]
        examples = {1: torch.tensor(assets.x_test[:1]), 64: torch.tensor(assets.x_test[:64])}
        done: dict[str, dict[str, Any]] = {}
        for recipe in recipes_for(model_name, size):
            row: dict[str, Any] = {
                "model": model_name,
                "recipe": recipe["name"],
                "kind": recipe["kind"],
                "stages": _label(recipe["stages"]),
                "notes": [],
            }
            if recipe.get("preset_problem"):
                row["notes"].append(
                    f"the API rejects this preset as defined ({recipe['preset_problem']}); "
                    "ran its stages without the options that equal their defaults"
                )
            key = _validated_key(recipe["stages"])
            if key in done:
                same = done[key]
                row.update({k: v for k, v in same.items() if k not in ("recipe", "kind", "notes", "stages")})
                row["notes"].append(f"same validated stages as {same['recipe']}: figures shared, not re-run")
                rows.append(row)
                continue
            artifact = assets.folder / f"artifact-{model_name}-{len(rows)}.bin"
            log(f"quality: {model_name} {recipe['name']}")
            started = time.perf_counter()
            try:
                result = run_engine(engine_request(assets, model_name, recipe["stages"], artifact))
            except Exception as error:  # a failing scheme is a finding, not a crash of the benchmark
                row.update(
                    error=f"{type(error).__name__}: {str(error)[:300]}", wall_s=round(time.perf_counter() - started, 3)
                )
                rows.append(row)
                continue
            metrics = result["metrics"]
            original, compressed = metrics["original"], metrics["compressed"]
            row.update(
                artifact_format=result["artifact_format"],
                original_bytes=original["size_bytes"],
                artifact_bytes=compressed["size_bytes"],
                size_ratio=metrics["compression_ratio"],
                accuracy_before=original["accuracy"],
                accuracy_after=compressed["accuracy"],
                accuracy_change=(
                    round(compressed["accuracy"] - original["accuracy"], 4)
                    if compressed["accuracy"] is not None and original["accuracy"] is not None
                    else None
                ),
                service_speedup_b64=metrics["speedup"],
                compress_s=result["compress_s"],
                wall_s=result["wall_s"],
                parameters=compressed["parameters"],
                nonzero_parameters=compressed["nonzero_parameters"],
                warnings=metrics["warnings"],
            )
            if recipe["name"] == "search:accuracy_aware":
                info = metrics["stages"][0]["info"]
                row["notes"].append(
                    f"search chose {info['chosen'].get('candidate')} "
                    f"after {info['trials_run']} trials ({info['result']})"
                )
            try:
                loaded = load_artifact_module(artifact, result["artifact_format"], architecture)
                latency = paired_latency(model, loaded, examples, size.latency_budget_s, size.latency_rounds)
                row.update(
                    latency_ms_b1=latency[1]["ms"],
                    latency_ms_b64=latency[64]["ms"],
                    float_latency_ms_b1=latency[1]["baseline_ms"],
                    float_latency_ms_b64=latency[64]["baseline_ms"],
                    speedup_b1=latency[1]["speedup"],
                    speedup_b64=latency[64]["speedup"],
                )
                if result["artifact_format"] in ("state_dict", "sparse_state_dict"):
                    row["notes"].append("weights file: runs as the dense architecture once loaded")
            except Exception as error:
                row["notes"].append(f"artifact could not be timed here: {type(error).__name__}: {error}"[:300])
            artifact.unlink(missing_ok=True)
            done[key] = row
            rows.append(row)
    return _section(size, assets, rows)


def _section(size: Size, assets: Assets, rows: list[dict[str, Any]]) -> dict[str, Any]:
    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append(
                [
                    MODELS[row["model"]]["label"].split(" (")[0],
                    _recipe_cell(row),
                    "FAILED",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    row["error"],
                ]
            )
            continue
        table_rows.append(
            [
                MODELS[row["model"]]["label"].split(" (")[0],
                _recipe_cell(row),
                row.get("artifact_format", "–"),
                fmt(row.get("size_ratio"), 2, "×"),
                f"{fmt(row.get('accuracy_before'), 3)} → {fmt(row.get('accuracy_after'), 3)}",
                fmt(None if row.get("accuracy_change") is None else 100 * row["accuracy_change"], 1, " pt"),
                fmt(row.get("speedup_b1"), 2, "×"),
                fmt(row.get("speedup_b64"), 2, "×"),
                fmt(row.get("compress_s"), 2, " s"),
                "; ".join(row["notes"]),
            ]
        )
    han = _han_table(rows)
    failed = [r for r in rows if "error" in r]
    return {
        "title": "1. Compression quality on scikit-learn digits",
        "intro": (
            "Each row is one `worker.compression.pipeline.run_job` call, the function the worker's sandboxed child "
            "runs, on a float model trained here on scikit-learn's 8×8 digits (1,257 training / 540 test images, "
            f"{size.base_epochs} epochs of AdamW). The model goes in as a state_dict with a registered "
            "architecture, the training split as the dataset (calibration, fine-tuning, distillation) and the "
            "test split as the eval dataset. Every scheme runs with its catalogue defaults (pruning amount 0.5, "
            "2:4 for N:M, distillation into a quarter-width student). **Size ratio** is the original "
            ".pt file over the artifact file the user downloads; **top-1** is the service's own figure on the "
            "eval dataset (the 540 test images); **speedup** is re-measured here on the artifact loaded the way a user loads "
            "it (TorchScript / exported program; state_dict files into the dense architecture) against the float "
            "model, median of interleaved runs, one thread; **compress** is the time in the stages (without "
            "loading, measuring and saving)."
        ),
        "command": command_for("quality", size.name),
        "tables": [
            {
                "title": "Every CPU scheme and preset",
                "columns": [
                    "model",
                    "recipe",
                    "artifact",
                    "size ratio",
                    "top-1 before → after",
                    "Δ top-1",
                    "speedup b=1",
                    "speedup b=64",
                    "compress",
                    "notes",
                ],
                "rows": table_rows,
            },
            han,
        ],
        "notes": [
            "Unstructured and N:M pruning are stored as a sparse_state_dict (dense or CSR, int32 indices): at the "
            "default amount of 0.5 that is no smaller than dense, and the zeros are not faster on CPU; the size "
            "pays off from about 60% sparsity, or from modest sparsity on with output_format compact_state_dict "
            "(a bitmask or int8/int16 relative indices: about 0.53x of dense at 50% zeros).",
            "fp16 / bf16 mostly run slower than float32 on this CPU (no native half-precision matmul kernels); they "
            "are for shrinking the file (about 1.8× with the TorchScript container) and for GPUs.",
        ]
        + (
            [
                f"{len(failed)} recipe(s) failed: "
                + "; ".join(f"{r['model']} {r['recipe']}: {r['error']}" for r in failed)
            ]
            if failed
            else []
        ),
        "targets": [],
        "data": {"rows": rows, "han_reference": HAN_REFERENCE, "train_seconds": assets.train_seconds},
    }


def _recipe_cell(row: dict[str, Any]) -> str:
    return f"{row['recipe']}: {row['stages']}" if row["kind"] == "preset" else row["stages"]


def _han_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mlp = [r for r in rows if r["model"] == "lenet-300-100" and "error" not in r and r.get("size_ratio")]
    ref = HAN_REFERENCE
    table_rows = [
        [
            ref["model"],
            ref["method"],
            fmt(ref["ratio"], 1, "×"),
            f"error {100 * ref['error_before']:.2f}% → {100 * ref['error_after']:.2f}%",
            f"reference, as published ({ref['source']}); not re-run here",
        ]
    ]
    deep = next((r for r in mlp if r["recipe"] == "preset deep-compression"), None)
    if deep is not None:
        table_rows.append(
            [
                "LeNet-300-100-style MLP on digits (64-300-100-10, 51K weights)",
                deep["stages"],
                fmt(deep["size_ratio"], 2, "×"),
                f"error {100 * (1 - deep['accuracy_before']):.2f}% → {100 * (1 - deep['accuracy_after']):.2f}%",
                "measured here (preset deep-compression)",
            ]
        )
    within = [r for r in mlp if r.get("accuracy_change") is not None and r["accuracy_change"] >= -0.01]
    best = max(within, key=lambda r: r["size_ratio"]) if within else None
    if best is not None and deep is not None and best["stages"] == deep["stages"]:
        table_rows[-1][-1] += "; also the smallest artifact of any row within 1 point of top-1"
    elif best is not None:
        table_rows.append(
            [
                "LeNet-300-100-style MLP on digits",
                best["stages"],
                fmt(best["size_ratio"], 2, "×"),
                f"error {100 * (1 - best['accuracy_before']):.2f}% → {100 * (1 - best['accuracy_after']):.2f}%",
                "measured here: the smallest artifact of any row within 1 point of top-1",
            ]
        )
    return {
        "title": "LeNet-300-100 next to Han et al.'s 40×",
        "columns": ["model", "method", "size ratio", "top-1 error", "source"],
        "rows": table_rows,
        "caption": (
            "Not a parity claim: different data (8×8 digits, 64 inputs, not 28×28 MNIST, so a first "
            "layer 12× smaller), and ModelPress's preset is not Han et al.'s pipeline: "
            f"{_preset_summary('deep-compression')}."
        ),
    }


def _preset_summary(name: str) -> str:
    from modelpress.catalog import PRESETS

    return str(PRESETS.get(name, {}).get("summary", "")).rstrip(".")
