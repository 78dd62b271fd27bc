"""Per-layer quantization sensitivity: which layers hurt the whole model's output when quantized.

For each quantizable layer (every Linear for dynamic int8; Linear and Conv for static int8) the
model is run with only that layer quantized by the real backend, and the whole model's output is
compared with the float model's: SQNR in dB, and the top-1 drop when the probe set has labels.
Rows come back most harmful first. The cost is one quantization (or, for static int8, one
calibration pass) plus one evaluation per layer:

- eager and exported models: the whole model is quantized once and each quantized layer is swapped
  into the float model in turn, so a layer costs one forward pass over the probe set;
- TorchScript: `quantize_dynamic_jit(..., inplace=False)` with only that layer's qconfig, which clones
  the module in C++ (about a second on a 6-layer BERT-base) instead of reloading the archive.

`analyze/sensitivity` (a stage that delivers the model unchanged) and mixed precision
(`worker.compression.mixed_precision`) both read this table.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.compression import metrics as measure
from worker.compression.base import EngineError, StageContext, StageResult, with_defaults
from worker.compression.inputs import Batch
from worker.compression.upstream_cache import UpstreamCache

DEFAULT_PROBE_SAMPLES = 64
# Without labels the table is an SQNR over every output element. On the 6-layer BERT-base of
# bench/sensitivity.py (98,304 output elements per 128-token sequence) every layer's SQNR on 8
# sequences is within 0.52 dB of its SQNR on 16 and the most harmful layer is the same, so the
# analyze stage's probe stops at this many output elements (never under MIN_PROBE_SAMPLES samples)
# and each layer's pass costs half as much there. A job that needs finer figures gives labels.
STABLE_SQNR_ELEMENTS = 1 << 19
MIN_PROBE_SAMPLES = 8


@dataclass
class Probe:
    """The inputs every variant is judged on, with the float model's outputs on them."""

    inputs: Batch
    labels: torch.Tensor | None
    reference: measure.Outputs
    reference_accuracy: float | None

    def judge(self, model: nn.Module) -> tuple[float | None, float | None]:
        """(SQNR dB against the float outputs, None when identical; accuracy drop, None without labels)."""
        outputs = measure.predict(model, self.inputs)
        sqnr = measure.fidelity(self.reference, outputs)["sqnr_db"]
        accuracy = measure.accuracy(outputs, self.labels)
        drop = None if accuracy is None or self.reference_accuracy is None else self.reference_accuracy - accuracy
        return sqnr, (None if drop is None else round(drop, 6))


def make_probe(
    model: nn.Module, ctx: StageContext, samples: int | None = None, stable_elements: int | None = None
) -> Probe:
    """The job's own fidelity set (the eval set with its labels, else training inputs, else noise),
    cut to `samples` when given, so the figures here are those the job reports.

    With `stable_elements` and no labels, the set is cut further to the fewest samples (at least
    MIN_PROBE_SAMPLES) whose outputs hold that many elements: the SQNR is a ratio over every output
    element and past that count it moves little (see STABLE_SQNR_ELEMENTS).
    """
    inputs, labels = measure.fidelity_inputs(ctx.example_input, ctx.eval_data, ctx.train_data, seed=ctx.seed)
    if samples is not None:
        inputs = inputs[:samples]
        labels = None if labels is None else labels[:samples]
    if stable_elements is not None and labels is None and len(inputs) > MIN_PROBE_SAMPLES:
        per_sample = max(1, measure.predict(model, inputs[:1]).primary.numel())
        inputs = inputs[: max(MIN_PROBE_SAMPLES, math.ceil(stable_elements / per_sample))]
    reference = measure.predict(model, inputs)
    return Probe(inputs, labels, reference, measure.accuracy(reference, labels))


def harm_key(row: dict[str, Any]) -> tuple[float, float]:
    """Sort key, most harmful first: the larger top-1 drop, then the lower SQNR (None = exact)."""
    drop = row.get("accuracy_drop")
    sqnr = row.get("sqnr_db")
    return (-(drop if drop is not None else 0.0), sqnr if sqnr is not None else math.inf)


def layer_sensitivity(
    model: nn.Module,
    scheme: str,
    ctx: StageContext,
    probe: Probe,
    options: dict[str, Any] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per quantizable layer, {"layer", "sqnr_db", "accuracy_drop"}, most harmful first.

    Args:
        model: the float model (eager, exported-graph module or ScriptModule, per `ctx.kind`).
        scheme: "dynamic_int8" or "static_int8".
        ctx: calibration data (static int8) and the model kind.
        probe: the inputs and float outputs each single-layer variant is compared on.
        options: the quantize stage's options (calibration_batches, ...); skip_layers are not probed.

    Example:
        >>> rows = layer_sensitivity(model, "dynamic_int8", ctx, make_probe(model, ctx))
        >>> rows[0]["layer"]  # the layer whose quantization hurts the output most
    """
    from worker.compression.quantization.plan import _quiet_deprecations

    report = progress or (lambda fraction, message: None)
    options = dict(options or {})
    with _quiet_deprecations():
        variants = _single_layer_variants(model, scheme, options, ctx)
        cache = _upstream_cache(variants, probe)
        rows: list[dict[str, Any]] = []
        for index, (name, quantized_alone) in enumerate(variants.items()):
            ctx.check_cancelled()
            with cache.skipping_before(name) if cache is not None else nullcontext(), quantized_alone as variant:
                sqnr, drop = probe.judge(variant)
            rows.append({"layer": name, "kind": _layer_kind(model, name), "sqnr_db": sqnr, "accuracy_drop": drop})
            report((index + 1) / max(1, len(variants)), f"sensitivity {index + 1}/{len(variants)}: {name}")
    return sorted(rows, key=harm_key)


def _upstream_cache(variants: dict[str, Any], probe: Probe) -> UpstreamCache | None:
    """When every variant swaps one layer into the float model, the modules before it need not run again."""
    if not variants or not all(isinstance(v, _Swapped) for v in variants.values()):
        return None
    root = next(iter(variants.values())).root
    return UpstreamCache.record(root, probe.inputs, list(variants))


def _layer_kind(model: Any, name: str) -> str:
    """The layer's type name (Linear, Conv2d, ...), as the contract's `kind` column reports it."""
    try:
        module = model.get_submodule(name)
    except (AttributeError, RuntimeError):
        return "unknown"
    return str(getattr(module, "original_name", None) or type(module).__name__)


def _single_layer_variants(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Layer name -> a context manager yielding the model with only that layer quantized."""
    if scheme == "dynamic_int8" and ctx.kind == "torchscript":
        return _torchscript_dynamic_variants(model, options)
    if scheme == "dynamic_int8":
        return _eager_dynamic_variants(model, options, ctx)
    if scheme == "static_int8" and ctx.kind in ("eager", "graph"):
        return _static_variants(model, options, ctx)
    raise EngineError(
        f"sensitivity analysis probes dynamic_int8 or static_int8 (static needs an eager or exported "
        f"model), not {scheme} on a {ctx.kind} model"
    )


class _Swapped:
    """Puts `replacement` at `path` in `root` for the duration of a with-block."""

    def __init__(self, root: nn.Module, path: str, replacement: nn.Module) -> None:
        self.root, self.path, self.replacement = root, path, replacement
        self.original: nn.Module | None = None

    def __enter__(self) -> nn.Module:
        self.original = self.root.get_submodule(self.path)
        _set_submodule(self.root, self.path, self.replacement)
        return self.root

    def __exit__(self, *exc: object) -> None:
        assert self.original is not None
        _set_submodule(self.root, self.path, self.original)


class _Given:
    """A with-block that yields a model made beforehand."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        self.make = make

    def __enter__(self) -> nn.Module:
        return self.make()

    def __exit__(self, *exc: object) -> None:
        return None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _eager_dynamic_variants(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from worker.compression.quantization import _DYNAMIC_TYPES, plan_layers, torch_level_module

    float_model = torch_level_module(model) if ctx.kind == "graph" else model
    candidates = [name for name, module in float_model.named_modules() if name and type(module) in _DYNAMIC_TYPES]
    targets = plan_layers(candidates, options).targets
    if not targets:
        raise EngineError("sensitivity found no Linear / LSTM / GRU layer to probe with dynamic_int8")
    quantized = quantize_dynamic(
        float_model,
        {name: per_channel_dynamic_qconfig for name in targets},  # type: ignore[no-untyped-call]  # torch leaves this unannotated
        dtype=torch.qint8,
        inplace=False,
    )
    # the float model itself takes each quantized layer in turn and gets its own back afterwards
    return {name: _Swapped(float_model, name, quantized.get_submodule(name)) for name in targets}


def _torchscript_dynamic_variants(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic_jit

    from worker.compression.quantization import (
        _fresh_script_copy,
        _isolate_control_flow_outputs,
        _script_type_name,
        plan_layers,
    )

    if not isinstance(model, torch.jit.ScriptModule):
        raise EngineError("a torchscript-kind model must be a torch.jit.ScriptModule")
    candidates = [name for name, module in model.named_modules() if name and _script_type_name(module) == "Linear"]
    targets = plan_layers(candidates, options).targets
    if not targets:
        raise EngineError("sensitivity found no Linear layer to probe in this TorchScript model")
    working = _fresh_script_copy(model)
    _isolate_control_flow_outputs(working)

    def alone(name: str) -> Callable[[], nn.Module]:
        return lambda: quantize_dynamic_jit(working, {"": None, name: per_channel_dynamic_qconfig}, inplace=False)  # type: ignore[no-untyped-call]  # torch leaves this unannotated

    return {name: _Given(alone(name)) for name in targets}


def _static_variants(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    # One calibration pass: prepare every candidate, calibrate, then convert a copy per layer with
    # every other layer's qconfig set to None (convert_fx accepts None for a key given at prepare time).
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from worker.compression.quantization import (
        _STATIC_TYPES,
        _calibration_batches,
        cpu_has_vnni,
        full_range_qconfig,
        plan_layers,
        torch_level_module,
    )

    float_model = torch_level_module(model) if ctx.kind == "graph" else model
    candidates = [name for name, module in float_model.named_modules() if name and type(module) in _STATIC_TYPES]
    targets = plan_layers(candidates, options).targets
    if not targets:
        raise EngineError("sensitivity found no Linear / Conv layer to probe with static_int8")
    qconfig = full_range_qconfig() if cpu_has_vnni() else get_default_qconfig_mapping("x86").global_qconfig
    mapping = get_default_qconfig_mapping("x86").set_global(qconfig)
    for name in candidates:
        mapping.set_module_name(name, qconfig if name in targets else None)
    prepared = prepare_fx(copy.deepcopy(float_model).eval(), mapping, (ctx.example_input,))
    with torch.no_grad():
        for batch in _calibration_batches(options, ctx):
            prepared(batch)

    def alone(name: str) -> Callable[[], nn.Module]:
        def convert() -> nn.Module:
            only = copy.deepcopy(mapping)  # convert_fx wants prepare's global qconfig and keys
            for other in candidates:
                only.set_module_name(other, qconfig if other == name else None)
            return convert_fx(copy.deepcopy(prepared), qconfig_mapping=only).eval()

        return convert

    return {name: _Given(alone(name)) for name in targets}


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """`analyze/sensitivity`: measure the per-layer table and deliver the model unchanged.

    Args:
        model: the float model, any kind.
        scheme: "sensitivity".
        options: `quantization` (the scheme to probe), `samples` (probe-set size), `pruning` (also the
            per-layer pruning table, `worker.compression.sensitivity_pruning`), and an optional
            bar (`min_sqnr_db` / `max_accuracy_drop`) for which a `skip_layers` is suggested and verified.
        ctx: data and model kind.

    Returns:
        The same model, with `info.sensitivity` (rows, most harmful first), `info.all_quantized`
        (the whole model quantized), with `pruning` `info.pruning_sensitivity`, and, given a bar,
        `info.suggested_skip_layers`.
    """
    if scheme != "sensitivity":
        raise EngineError(f"unknown analyze scheme {scheme!r}")
    options = with_defaults("analyze", scheme, options)
    probed = str(options["quantization"])
    quantize_options = {k: options[k] for k in ("calibration_batches",) if options.get(k) is not None}
    asked = int(options["samples"])
    probe = make_probe(model, ctx, asked, stable_elements=STABLE_SQNR_ELEMENTS)
    pruning = bool(options.get("pruning"))
    share = 0.4 if pruning else 0.8
    rows = layer_sensitivity(
        model, probed, ctx, probe, quantize_options, progress=lambda f, m: ctx.progress(share * f, m)
    )
    info: dict[str, Any] = {
        "quantization": probed,
        "probe_samples": len(probe.inputs),
        "probe_samples_asked": asked,
        "probe_labels": probe.labels is not None,
        "sensitivity": rows,
    }
    if pruning:
        from worker.compression.sensitivity_pruning import PRUNING_AMOUNTS, pruning_sensitivity

        info["pruning_amounts"] = list(PRUNING_AMOUNTS)
        info["pruning_sensitivity"] = pruning_sensitivity(
            model, ctx, probe, progress=lambda f, m: ctx.progress(0.4 + 0.4 * f, m)
        )
    bar_given = options.get("min_sqnr_db") is not None or options.get("max_accuracy_drop") is not None
    from worker.compression.mixed_precision import Bar, keep_float_until

    ctx.progress(0.85, "whole model quantized")
    search = keep_float_until(
        model,
        probed,
        quantize_options,
        ctx,
        Bar(options.get("min_sqnr_db"), options.get("max_accuracy_drop")),
        rows,
        judge_probe=probe,
        stop_at_first=not bar_given,
    )
    info["all_quantized"] = search.steps[0]
    if bar_given:
        info["bar"] = search.bar.describe()
        info["suggested_skip_layers"] = search.float_layers
        info["bar_met"] = search.met
        info["steps"] = search.steps
    ctx.progress(1.0, f"{len(rows)} layers probed")
    return StageResult(model=model, kind=ctx.kind, info=info)
