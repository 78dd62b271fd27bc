"""`modelpress compress --local`: the same spec run with the engine in a child process, no server at all.

The spec is validated as the API would validate it; torch and the engine are imported only once it is valid.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from modelpress.cli_output import _print_json, err, out, print_result, progress_bar
from modelpress.client_cli import _json_arg, default_report_path
from modelpress.job_status import JobStatus

MAX_LOCAL_ARCHIVE_BYTES = 1 << 40


def local_request(args: argparse.Namespace, spec: dict[str, Any], artifact_path: Path) -> Any:
    """Validate the spec as the API would and build the engine's JobRequest."""
    from modelpress.catalog import JobFacts, SpecError, expand_preset, validate_stages
    from modelpress.formats import FormatError, sniff_dataset, sniff_model_format

    model_path = Path(args.model)
    if not model_path.is_file():
        raise SpecError(f"{args.model} is not a file (--local runs on a model file, not an uploaded model id)")
    stages = list(spec.get("stages") or [])
    if spec.get("preset"):
        if stages:
            raise SpecError("give either a preset or stages, not both")
        stages = expand_preset(spec["preset"])
    if spec.get("search") is not None:
        if stages:
            raise SpecError("give either search or stages, not both")
        stages = [dict(spec["search"], method="search")]
    try:
        model_format = args.format or sniff_model_format(model_path, MAX_LOCAL_ARCHIVE_BYTES)
        datasets = {}
        for name in ("dataset", "eval_dataset"):
            value = getattr(args, name)
            if value:
                if not Path(value).is_file():
                    raise SpecError(f"--{name.replace('_', '-')} {value} is not a file (--local uses dataset files)")
                datasets[name] = (value, sniff_dataset(Path(value), MAX_LOCAL_ARCHIVE_BYTES))
    except FormatError as error:
        raise SpecError(str(error)) from error
    target = spec.get("target") or {}
    device = target.get("device", "cpu")
    facts = JobFacts(
        model_format=model_format,
        device=device,
        has_dataset="dataset" in datasets,
        dataset_has_labels="labels" in datasets.get("dataset", (None, {}))[1].get("arrays", []),
        eval_has_labels="labels" in datasets.get("eval_dataset", (None, {}))[1].get("arrays", []),
    )
    validated = validate_stages(stages, facts)
    for stage in validated:
        student = stage.options.get("student")
        if isinstance(student, dict) and "model_id" in student:
            raise SpecError("a student given by model_id needs a server; use student.architecture with --local")
    shape = spec.get("example_input_shape")
    if shape is None and not datasets:
        raise SpecError("example_input_shape is required when no dataset gives the input shape")
    architecture = _json_arg(args.architecture) or spec.get("architecture")
    from worker.compression.pipeline import JobRequest, ModelRef  # torch: only once the spec is valid

    return JobRequest(
        model=ModelRef(path=str(model_path), format=model_format, architecture=architecture),
        stages=[v.config for v in validated],
        artifact_path=str(artifact_path),
        example_input_shape=shape,
        dataset_path=datasets.get("dataset", (None,))[0],
        eval_dataset_path=datasets.get("eval_dataset", (None,))[0],
        device=device,
        output_format=spec.get("output_format"),
        seed=int(spec.get("seed", 0)),
        threads=int(target.get("threads", 1)),
    )


def _compress_local(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    from modelpress.catalog import SpecError

    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".modelpress-", dir=target.parent) as scratch:
        artifact = Path(scratch) / "artifact.bin"
        try:
            request = local_request(args, spec, artifact)
        except SpecError as error:
            err.print(f"[red]error:[/red] invalid spec: {error}")
            return 2
        events: list[tuple[str, dict[str, Any]]] = []
        outcome = _run_local_child(request, Path(scratch) / "work", events)
        if not outcome.ok:
            failure = outcome.error or {"error": "Unknown", "detail": "the job ended without a result"}
            err.print(f"[red]error:[/red] {failure.get('detail') or failure.get('error')}")
            return 1
        result = outcome.result
        assert result is not None
        artifact.replace(target)
    metrics = result["metrics"]
    report = _local_report(args, spec, result, events)
    if args.json:
        _print_json(
            {
                "metrics": metrics,
                "artifact_format": result["artifact_format"],
                "artifact": str(target),
                "requires": result.get("requires", []),
                "report": str(report),
            }
        )
    else:
        print_result(metrics, target, f"{Path(args.model).name}: local run ({result['artifact_format']})")
        out.print(f"report: {report}", soft_wrap=True)
    return 0


def _local_report(
    args: argparse.Namespace, spec: dict[str, Any], result: dict[str, Any], events: list[tuple[str, dict[str, Any]]]
) -> Path:
    """The same HTML report the server writes, from this run's metrics and events."""
    from app.report import report_html

    target = Path(args.report or default_report_path(args.out))
    job = {
        "id": "local run",
        "status": JobStatus.SUCCEEDED.value,
        "spec": spec,
        "metrics": result["metrics"],
        "artifact": {"format": result["artifact_format"], "requires": result.get("requires", [])},
    }
    target.write_text(report_html(job, events), encoding="utf-8")
    return target


def _run_local_child(request: Any, scratch: Path, events: list[tuple[str, dict[str, Any]]]) -> Any:
    """Run the job like the service does, in a child process, so a native crash of the model's
    code (a segfault, an abort) ends the child with a message here, not this process.

    The limits are the user's machine's own (no caps): the child is for survival, not for
    distrust of a model the user runs on their own machine anyway.
    """
    import resource

    from worker.sandbox import Limits, run_sandboxed

    unlimited = resource.RLIM_INFINITY
    # the CPU limit's hard cap is soft + 5 s, so "unlimited" is a very large number there
    limits = Limits(
        memory_bytes=unlimited,
        cpu_seconds=10**9,
        file_bytes=unlimited,
        open_files=4096,
        wall_seconds=7 * 24 * 3600.0,
        threads=max(1, request.threads),
    )
    with progress_bar("local") as update:

        def on_message(message: dict[str, Any]) -> None:
            if message.get("type") == "progress":
                update(float(message["fraction"]), str(message["stage"]))
            elif message.get("type") == "event":
                events.append((str(message.get("kind")), message.get("data") or {}))
                update.log(f"{message.get('kind')}: {json.dumps(message.get('data'))}")

        # no namespaces here: it is the user's own model on the user's own machine (which may lack bubblewrap)
        outcome = run_sandboxed("job", request.to_dict(), scratch, limits, on_message=on_message, isolation="none")
        if outcome.ok:
            update(1.0, "done")
    return outcome
