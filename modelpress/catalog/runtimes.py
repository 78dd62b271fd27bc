"""The runtimes an artifact can be built for (torch, ONNX Runtime, ExecuTorch) and checking a job against one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelpress.catalog.schemes import DEFAULT_SCHEME
from modelpress.catalog.specs import Device, SpecError


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime an artifact can be built for: its format, devices and the schemes it takes.

    Quantize schemes are applied by the runtime's own tools on the exported float model;
    prune and distill stages run in PyTorch first and export as they are.
    """

    name: str
    output_format: str
    devices: tuple[Device, ...]
    schemes: dict[str, tuple[str, ...]]
    package: str
    library: str


_FLOAT_STAGES = {
    "prune": (
        "l1_unstructured",
        "random_unstructured",
        "global_l1_unstructured",
        "ln_structured",
        "nm_semi_structured",
    ),
    "distill": ("hinton",),
}
RUNTIMES: dict[str, RuntimeSpec] = {
    "onnxruntime": RuntimeSpec(
        "onnxruntime",
        "onnx",
        ("cpu",),
        {**_FLOAT_STAGES, "quantize": ("dynamic_int8", "static_int8"), "search": ("accuracy_aware",)},
        "onnxruntime",
        "torch.onnx.export(dynamo=True); onnxruntime.quantization (quantize_dynamic, quantize_static QDQ per-channel)",
    ),
    "executorch": RuntimeSpec(
        "executorch",
        "executorch",
        ("cpu",),
        {**_FLOAT_STAGES, "quantize": ("dynamic_int8", "static_int8")},
        "executorch",
        "executorch.exir to_edge_transform_and_lower + XNNPACK partitioner; XNNPACKQuantizer (PT2E) for int8",
    ),
}
TORCH_FORMATS = ("torchscript", "exported_program", "state_dict", "sparse_state_dict", "deep_compression")


def resolve_runtime(runtime: str, runtime_given: bool, output_format: str | None) -> str:
    """The job's runtime: as given, else the one an onnx / executorch output_format implies."""
    if not runtime_given and runtime == "torch":
        for name, spec in RUNTIMES.items():
            if output_format == spec.output_format:
                return name
    return runtime


def validate_target(
    runtime: str,
    device: str,
    output_format: str | None,
    stages: list[dict[str, Any]],
    model_format: str,
    installed: Any = None,
) -> None:
    """Check that the runtime can serve this job: format, device, every stage's scheme, the package.

    `installed(package) -> bool` says whether the worker image has the runtime's package (the API
    checks with importlib.util.find_spec, which imports nothing).
    """
    if runtime == "torch":
        if output_format in ("onnx", "executorch"):
            raise SpecError(
                f"output_format {output_format!r} is built for target.runtime "
                f"{'onnxruntime' if output_format == 'onnx' else 'executorch'!r}, not torch"
            )
        return
    spec = RUNTIMES[runtime]
    if output_format not in (None, spec.output_format):
        raise SpecError(
            f"target.runtime {runtime!r} serves output_format {spec.output_format!r}, not {output_format!r}"
        )
    if device not in spec.devices:
        raise SpecError(f"target.runtime {runtime!r} runs on {list(spec.devices)} in this deployment, not {device!r}")
    if model_format == "torchscript":
        raise SpecError(
            f"a TorchScript model cannot be exported for {runtime}; upload an exported program "
            "or a state_dict with its architecture"
        )
    if installed is not None and not installed(spec.package):
        raise SpecError(
            f"target.runtime {runtime!r} needs the {spec.package!r} package, which this deployment "
            "does not have installed"
        )
    for index, stage in enumerate(stages):
        method, scheme = stage.get("method"), stage.get("scheme") or DEFAULT_SCHEME.get(str(stage.get("method")))
        if scheme not in spec.schemes.get(str(method), ()):
            supported = {m: list(s) for m, s in spec.schemes.items()}
            raise SpecError(
                f"stages[{index}]: {method}/{scheme} is not available for target.runtime {runtime!r}; "
                f"it supports {supported}"
            )
