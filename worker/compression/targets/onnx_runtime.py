"""ONNX export (torch.onnx dynamo exporter) and ONNX Runtime: quantization, loading, running.

Int8 for this runtime is made by ONNX Runtime's own tools on the exported float graph, so the
file is what ORT's int8 kernels run fast: dynamic int8 (`quantize_dynamic`: int8 weights,
activations quantized per call) and static QDQ int8 (`quantize_static` calibrated on the job's
dataset, per-channel weights, uint8 activations). Measured on this 2-core AVX-512 VNNI box at one
thread, batch 1: a 2-block ResNet-like CNN on 3x64x64 inputs ran 0.76 ms in ORT fp32 and 0.30 ms
as static QDQ int8 (47 dB SQNR on its logits).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from worker.compression import breadcrumbs
from worker.compression.base import EngineError
from worker.compression.inputs import (
    Batch,
    ModelInputs,
    OutputSelector,
    Signature,
    export_example,
    select_output,
)
from worker.compression.targets.common import as_eval, run_in_chunks
from worker.compression.torchscript_conversion import torchscript_to_graph

INPUT_NAME = "input"
OUTPUT_NAME = "output"
CALIBRATION_BATCH_SIZE = 32


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


class ServedCall(nn.Module):
    """The call a runtime serves: the declared tensors in, the scored output out.

    Constant keyword arguments (`forward_kwargs`) are baked into the exported graph and only the
    output the job scores (`output`, default the first floating tensor) is returned, so the ONNX
    file takes exactly the declared inputs by name and gives one output.
    """

    def __init__(self, inner: nn.Module, constants: dict[str, Any], output: OutputSelector) -> None:
        super().__init__()
        self.inner = inner
        self.constants = dict(constants)
        self.output = output

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return select_output(self.inner(*tensors, **self.constants), self.output)


def _exported_named(
    model: nn.Module, example: ModelInputs, signature: Signature | None, output: OutputSelector
) -> torch.export.ExportedProgram:
    """torch.export of the served call with the declared dynamic dimensions (batch, sequence, ...)."""
    served = ServedCall(model, example.kwargs, output)
    stretched = export_example(signature, example)
    assert isinstance(stretched, ModelInputs)  # ModelInputs in, ModelInputs out
    # Dim.AUTO, as for one tensor: the range the model allows (a BERT's sequence stops at its position
    # table; an uploaded program keeps its own), and ids and mask share their sizes as the graph says.
    # forward(*tensors) is one variadic argument to torch.export: its shapes nest one level down.
    declared = [spec.dynamic for spec in signature.inputs] if signature is not None else [(0,)] * len(example.tensors)
    shapes = (
        tuple(
            {dim: torch.export.Dim.AUTO for dim in dynamic if dim < tensor.dim()} or None
            for tensor, dynamic in zip(stretched.tensors, declared)
        ),
    )
    try:
        return torch.export.export(served, tuple(stretched.tensors), dynamic_shapes=shapes)
    except Exception as error:
        raise EngineError(
            "the model could not be captured with torch.export for ONNX with the declared dynamic dimensions: "
            f"{_first_line(error)}"
        ) from error


def _exported_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension where the model allows one (Dim.AUTO keeps the
    range an uploaded exported program declares, and specialises a model that fixes its batch)."""
    if example.shape[0] == 1:  # torch.export specialises a dimension of size 1
        example = torch.cat([example, example])
    breadcrumbs.operation("export: torch.export")
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as error:
        raise EngineError(
            f"the model could not be captured with torch.export for ONNX: {_first_line(error)}"
        ) from error


def export_onnx(
    model: nn.Module,
    example: Batch,
    path: Path,
    signature: Signature | None = None,
    output: OutputSelector = None,
) -> None:
    """Write `model` as a float ONNX model with output `output`: one input `input` (dynamic batch)
    for a one-tensor model, else the declared inputs by name (`input_ids`, `attention_mask`, ...)
    with their declared dynamic dimensions and constant arguments baked in."""
    if isinstance(model, torch.jit.ScriptModule):
        # torch.export cannot capture a ScriptModule; torch's converter gives the same graph as a program
        model = torchscript_to_graph(model, signature, example)
    model = as_eval(model)
    if isinstance(example, ModelInputs):
        program = _exported_named(model, example, signature, output)
        args: tuple[torch.Tensor, ...] = tuple(example.tensors)
        names = list(example.names)
    else:
        program = _exported_program(model, example)
        args, names = (example,), [INPUT_NAME]
    breadcrumbs.operation("export: torch.onnx.export")
    try:
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            input_names=names,
            output_names=[OUTPUT_NAME],
            optimize=True,
            verbose=False,
        )
    except Exception as error:
        raise EngineError(explain_export_failure(error, program)) from error
    assert onnx_program is not None
    onnx_program.save(str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def explain_export_failure(error: BaseException, program: torch.export.ExportedProgram) -> str:
    """One sentence naming the op ONNX cannot take and where the model's source calls it."""
    text = "\n".join(str(e) for e in _error_chain(error))
    match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
    op = f"{match.group(1)}.{match.group(2)}" if match else None
    node_match = re.search(r"translating node %(\w+)", text)
    location = _source_location(program, node_match.group(1) if node_match else None, op)
    if op is None and node_match is None:
        return f"ONNX export failed: {_first_line(error)}"
    what = f"op {op}" if op else f"node {node_match.group(1) if node_match else '?'}"
    where = f" called at {location}" if location else ""
    return f"ONNX export failed: {what}{where} has no ONNX translation in torch.onnx (opset 18+)"


def _source_location(program: torch.export.ExportedProgram, node_name: str | None, op: str | None) -> str | None:
    base = op.split(".")[1] if op and "." in op else op
    candidates = [n for n in program.graph.nodes if n.op == "call_function"]
    chosen = [n for n in candidates if node_name and n.name == node_name]
    if not chosen and base:
        chosen = [n for n in candidates if base in str(n.target)]
    for node in chosen:
        trace = node.meta.get("stack_trace")
        if trace:
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', trace)
            if frames:
                file, line, function, code = frames[-1]
                return f"{Path(file).name}:{line} in {function} ({code.strip()})"
    return None


class _CalibrationReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
    """ORT's calibration reader over the job's calibration batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def feed(inputs: Batch) -> dict[str, np.ndarray]:
    """ORT's input dict for a batch: `input` for one tensor, else each declared input by its name."""
    if isinstance(inputs, ModelInputs):
        return {name: tensor.contiguous().numpy() for name, tensor in zip(inputs.names, inputs.tensors)}
    return {INPUT_NAME: inputs.contiguous().numpy()}


def quantize(
    float_path: Path, out_path: Path, scheme: str, calibration: Batch | None, options: dict[str, Any]
) -> dict[str, Any]:
    """ORT int8 of the float ONNX model at `float_path`; returns what the stage report says."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from worker.compression.quantization.static import cpu_has_vnni

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # shape inference and graph optimisation first, as ORT's quantization guide asks
        # ORT's symbolic shape inference writes its failed graph into the working directory
        breadcrumbs.operation(f"{scheme}: onnxruntime quant_pre_process")
        with contextlib.chdir(scratch):
            try:
                quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
            except Exception:
                # it gives up on some graphs with several dynamic dimensions (a BERT's batch and
                # sequence: "Incomplete symbolic shape inference"); ONNX's own shape inference and
                # the graph optimisation still run without it
                quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        skipped = _skipped_nodes(prepared, options)
        breadcrumbs.operation(f"{scheme}: onnxruntime quantization")
        # Without VNNI, ORT's u8s8 kernels add pairs of products in int16 (AVX2 vpmaddubsw), which
        # saturates with full-range int8 weights; 7-bit weights keep the sums in range. Measured on an
        # AVX2-only EPYC: the zoo BERT's hidden states at 26.5 dB with 8-bit weights.
        reduce_range = not cpu_has_vnni()
        weight_bits = "7-bit (reduce_range: no VNNI on this CPU)" if reduce_range else "8-bit"
        if scheme == "dynamic_int8":
            quantize_dynamic(
                str(prepared),
                str(out_path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                nodes_to_exclude=skipped,
            )
            return {
                "backend": "onnxruntime.quantization.quantize_dynamic (int8 weights per channel, activations per call)",
                "weights": weight_bits,
                "skipped_nodes": skipped,
            }
        if scheme == "static_int8":
            if calibration is None or len(calibration) == 0:
                raise EngineError("static_int8 needs calibration data: give the job a dataset_id")
            reader = _CalibrationReader([feed(b) for b in calibration.split(CALIBRATION_BATCH_SIZE)])
            quantize_static(
                str(prepared),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
                nodes_to_exclude=skipped,
            )
            return {
                "backend": "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, "
                "uint8 activations, MinMax calibration)",
                "weights": weight_bits,
                "calibration_samples": int(len(calibration)),
                "skipped_nodes": skipped,
            }
    raise EngineError(f"scheme {scheme!r} has no ONNX Runtime quantization; use dynamic_int8 or static_int8")


def _skipped_nodes(path: Path, options: dict[str, Any]) -> list[str]:
    """ONNX node names matching skip_layers globs (node names carry the torch module path)."""
    import fnmatch

    import onnx

    patterns = list(options.get("skip_layers") or [])
    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if any(fnmatch.fnmatch(node.name.replace("/", "."), f"*{p}*") for p in patterns)
    ]


class OrtModel:
    """An ONNX file loaded in an ORT InferenceSession on the CPU at a fixed thread count."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise EngineError(f"ONNX Runtime could not load the artifact: {_first_line(error)}") from error
        first = self.session.get_inputs()[0]
        # a model that fixes its batch size exports with a static one; inputs then run in chunks of it
        self.batch: int | None = first.shape[0] if isinstance(first.shape[0], int) else None

    def __call__(self, inputs: Batch) -> torch.Tensor:
        return run_in_chunks(self._run, inputs, self.batch)

    def _run(self, inputs: Batch) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, feed(inputs))[0])

    def timings_ms(self, example: Batch, warmup: int, iterations: int, budget_s: float) -> list[float]:
        fed = feed(example)
        for _ in range(warmup):
            self.session.run(None, fed)
        timings: list[float] = []
        started = time.perf_counter()
        while len(timings) < iterations and (len(timings) < 10 or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            self.session.run(None, fed)
            timings.append((time.perf_counter() - t0) * 1e3)
        return timings
