"""Client-side CLI commands: models, datasets, jobs, and the one-shot `compress`.

`compress` talks to a server (upload, submit, live progress, download, before/after table),
or with `--local` runs the same spec with the engine in a child process, no server at all.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelpress.client import Client, ClientError, Job

SPEC_ID_KEYS = ("model_id", "dataset_id", "eval_dataset_id")
MAX_LOCAL_ARCHIVE_BYTES = 1 << 40

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- helpers


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("MODELPRESS_API_KEY")
    if not key:
        raise SystemExit("error: no API key: pass --api-key or set MODELPRESS_API_KEY "
                         "(create one with `modelpress keys create --tenant NAME`)")
    return Client(args.url or os.environ.get("MODELPRESS_URL"), key)


def load_spec(path: str | Path) -> dict[str, Any]:
    """A JobSpec body (stages or preset, example_input_shape, target, output_format, ...) in YAML or JSON."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        spec = json.loads(text)
    else:
        import yaml

        spec = yaml.safe_load(text)  # YAML is a superset of JSON
    if not isinstance(spec, dict):
        raise SystemExit(f"error: {path} must hold a mapping (a JobSpec body), not {type(spec).__name__}")
    return spec


def _json_arg(value: str | None) -> Any:
    if value is None:
        return None
    candidate = Path(value)
    return json.loads(candidate.read_text() if candidate.is_file() else value)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f} ms"


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def metrics_table(metrics: dict[str, Any], title: str = "before / after") -> Table:
    """The before/after table of a job's metrics document (the same for server and --local runs)."""
    original, compressed = metrics.get("original") or {}, metrics.get("compressed") or {}
    fidelity = metrics.get("fidelity") or {}
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change", justify="right")
    ratio = metrics.get("compression_ratio") or _ratio(original.get("size_bytes"), compressed.get("size_bytes"))
    table.add_row("size", human_bytes(original.get("size_bytes")), human_bytes(compressed.get("size_bytes")),
                  f"{ratio:.2f}x smaller" if ratio else "")
    table.add_row("size (bytes)", _int(original.get("size_bytes")), _int(compressed.get("size_bytes")), "")
    table.add_row("parameters", _int(original.get("parameters")), _int(compressed.get("parameters")),
                  f"{compressed['parameters'] / original['parameters']:.2f}x"
                  if original.get("parameters") and compressed.get("parameters") else "")
    table.add_row("nonzero parameters", _int(original.get("nonzero_parameters")),
                  _int(compressed.get("nonzero_parameters")), "")
    table.add_row("sparsity", _pct(original.get("sparsity")), _pct(compressed.get("sparsity")), "")
    speedup = metrics.get("speedup")
    where = f"batch {metrics.get('batch_size', '?')}, {metrics.get('device', '?')}"
    table.add_row(f"latency p50 ({where})", _ms(original.get("latency_ms_p50")), _ms(compressed.get("latency_ms_p50")),
                  f"{speedup:.2f}x faster" if speedup and speedup >= 1 else
                  (f"{1 / speedup:.2f}x slower" if speedup else ""))
    table.add_row("latency p95", _ms(original.get("latency_ms_p95")), _ms(compressed.get("latency_ms_p95")), "")
    acc_o, acc_c = original.get("accuracy"), compressed.get("accuracy")
    table.add_row("accuracy", _pct(acc_o), _pct(acc_c),
                  f"{(acc_c - acc_o) * 100:+.2f} pt" if acc_o is not None and acc_c is not None else "")
    sqnr = fidelity.get("sqnr_db")
    table.add_row("fidelity: SQNR", "", "∞ dB" if sqnr is None and fidelity.get("output_mse") == 0 else
                  ("–" if sqnr is None else f"{sqnr:.1f} dB"), "")
    table.add_row("fidelity: top-1 agreement", "", _pct(fidelity.get("top1_agreement")), "")
    return table


def print_result(metrics: dict[str, Any], artifact: Path | None, title: str) -> None:
    out.print(metrics_table(metrics, title))
    for warning in metrics.get("warnings") or []:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    if artifact is not None:
        out.print(f"artifact: {artifact} ({artifact.stat().st_size:,} bytes)")


class _Bar:
    """A rich progress bar on stderr: call it with (fraction, stage); `log` prints a line above it."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.task = progress, progress.add_task(label, total=1.0, stage="")

    def __call__(self, fraction: float, stage: str | None) -> None:
        self.progress.update(self.task, completed=max(0.0, min(1.0, fraction)), stage=(stage or "")[:60])

    def log(self, text: str) -> None:
        self.progress.console.print(text, markup=False)


@contextmanager
def progress_bar(label: str) -> Iterator[_Bar]:
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[stage]}"), console=err, transient=False) as progress:
        yield _Bar(progress, label)


def _job_row(job: Job) -> list[str]:
    metrics = job.metrics or {}
    method = ",".join(f"{s.get('method')}:{s.get('scheme')}" for s in job.spec.get("stages", []))
    ratio = metrics.get("compression_ratio")
    return [job.id, job.status, method, f"{job.progress:.0%}", f"{ratio:.2f}x" if ratio else "",
            (job.created_at or "")[:19]]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fail(error: Exception) -> int:
    err.print(f"[red]error:[/red] {error}")
    return 1


# ---------------------------------------------------------------- models and datasets


def _cmd_models_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.upload_model(args.file, name=args.name, format=args.format,
                                    architecture=_json_arg(args.architecture))
    if args.json:
        _print_json(model.raw)
    else:
        print(f"{model.id}\t{model.format}\t{model.size_bytes:,} bytes\t{model.status}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models(limit=args.limit)
    if args.json:
        _print_json([m.raw for m in models])
        return 0
    table = Table("id", "name", "format", "size", "status", "created")
    for m in models:
        table.add_row(m.id, m.name, m.format, human_bytes(m.size_bytes), m.status, (m.created_at or "")[:19])
    out.print(table)
    return 0


def _cmd_datasets_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        dataset = client.upload_dataset(args.file, name=args.name)
    if args.json:
        _print_json(dataset.raw)
    else:
        print(f"{dataset.id}\t{dataset.format}\t{dataset.size_bytes:,} bytes")
    return 0


def _cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        datasets = client.datasets(limit=args.limit)
    if args.json:
        _print_json([d.raw for d in datasets])
        return 0
    table = Table("id", "name", "format", "size", "created")
    for d in datasets:
        table.add_row(d.id, d.name, d.format, human_bytes(d.size_bytes), (d.created_at or "")[:19])
    out.print(table)
    return 0


# ---------------------------------------------------------------- jobs


def _watch(client: Client, job_id: str, label: str) -> Job:
    with progress_bar(label) as update:
        return client.wait(job_id, progress=lambda j: update(j.progress, f"{j.status} {j.stage or ''}"))


def _cmd_jobs_submit(args: argparse.Namespace) -> int:
    body = load_spec(args.spec)
    for key, value in (("model_id", args.model), ("dataset_id", args.dataset), ("eval_dataset_id", args.eval_dataset)):
        if value:
            body[key] = value
    if "model_id" not in body:
        raise SystemExit("error: name the model with --model ID (or model_id in the spec)")
    with _client(args) as client:
        job = client.submit(body, idempotency_key=args.idempotency_key)
        if args.wait:
            job = _watch(client, job.id, job.id)
    if args.json:
        _print_json(job.raw)
    else:
        print(f"{job.id}\t{job.status}")
        if job.metrics:
            out.print(metrics_table(job.metrics, f"job {job.id}"))
    return 0 if job.status in ("queued", "running", "succeeded") else 1


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(client.jobs(status=args.status, model_id=args.model, method=args.method, limit=args.limit))
    if args.json:
        _print_json([j.raw for j in jobs])
        return 0
    table = Table("id", "status", "stages", "progress", "ratio", "created")
    for job in jobs:
        table.add_row(*_job_row(job))
    out.print(table)
    return 0


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
    if args.json:
        _print_json(job.raw)
        return 0
    out.print(f"[bold]{job.id}[/bold]  {job.status}  {job.progress:.0%}  {job.stage or ''}")
    out.print("stages: " + " → ".join(f"{s.get('method')}:{s.get('scheme')}" for s in job.spec.get("stages", [])))
    if job.error:
        out.print(f"[red]{job.error.get('error')}[/red]: {job.error.get('detail')}")
    if job.metrics:
        out.print(metrics_table(job.metrics, f"job {job.id}"))
    if job.artifact:
        out.print(f"artifact: {job.artifact.format}, {job.artifact.size_bytes:,} bytes, sha256 {job.artifact.sha256}")
    return 0


def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    print(f"{job.id}\t{job.status}" + ("\t(cancel requested)" if job.status == "running" else ""))
    return 0


def _cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client, progress_bar(args.job_id) as update:
        for event in client.events(args.job_id):
            if event.kind == "progress":
                update(float(event.data.get("progress", 0.0)), event.data.get("stage"))
            elif event.kind != "end":
                update.log(f"{event.kind}: {json.dumps(event.data)}")
        job = client.get_job(args.job_id)
        update(job.progress, job.status)
    print(f"{job.id}\t{job.status}")
    if job.error:
        out.print(f"[red]{job.error.get('error')}[/red]: {job.error.get('detail')}")
    return 0 if job.status == "succeeded" else 1


# ---------------------------------------------------------------- compress


def _dataset_id(client: Client, value: str) -> str:
    """A dataset file is uploaded; anything else is taken as the id of an uploaded dataset."""
    if Path(value).is_file():
        dataset = client.upload_dataset(value)
        err.print(f"uploaded {value} as {dataset.id}")
        return dataset.id
    return value


def _compress_server(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    with _client(args) as client:
        if Path(args.model).is_file():
            model = client.upload_model(args.model, name=args.name, format=args.format,
                                        architecture=_json_arg(args.architecture))
            err.print(f"uploaded {args.model} as {model.id} ({model.format}, {model.size_bytes:,} bytes)")
            spec["model_id"] = model.id
        else:
            spec["model_id"] = args.model
        for key, value in (("dataset_id", args.dataset), ("eval_dataset_id", args.eval_dataset)):
            if value:
                spec[key] = _dataset_id(client, value)
        job = client.submit(spec)
        err.print(f"submitted {job.id}")
        job = _watch(client, job.id, job.id)
        if job.status != "succeeded":
            detail = (job.error or {}).get("detail", "")
            err.print(f"[red]job {job.id} {job.status}[/red] {(job.error or {}).get('error', '')}: {detail}")
            return 1
        artifact = client.download(job.id, args.out)
        try:
            report: Path | None = client.save_report(job.id, args.report or default_report_path(args.out))
        except ClientError as error:  # a server older than the report endpoint: the job still succeeded
            err.print(f"[yellow]no report:[/yellow] {error}")
            report = None
    assert job.metrics is not None
    if args.json:
        _print_json({"job": job.raw, "artifact": str(artifact), "report": str(report) if report else None})
    else:
        print_result(job.metrics, artifact, f"{Path(args.model).name}: job {job.id}")
        if report is not None:
            out.print(f"report: {report}", soft_wrap=True)
    return 0


def default_report_path(artifact: str | Path) -> Path:
    """model.pt -> model.report.html beside it."""
    path = Path(artifact)
    return path.with_name(path.stem + ".report.html")


def _cmd_jobs_report(args: argparse.Namespace) -> int:
    with _client(args) as client:
        target = client.save_report(args.job_id, args.output or f"{args.job_id}-report.html")
    print(target.resolve())
    if args.open:
        import webbrowser

        if not webbrowser.open(target.resolve().as_uri()):
            err.print("no browser could be started; open the file above yourself")
    return 0


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
    facts = JobFacts(model_format=model_format, device=device, has_dataset="dataset" in datasets,
                     dataset_has_labels="labels" in datasets.get("dataset", (None, {}))[1].get("arrays", []),
                     eval_has_labels="labels" in datasets.get("eval_dataset", (None, {}))[1].get("arrays", []))
    validated = validate_stages(stages, facts)
    for stage in validated:
        student = stage.options.get("student")
        if isinstance(student, dict) and "model_id" in student:
            raise SpecError("a student given by model_id needs a server; use student.architecture with --local")
    shape = spec.get("example_input_shape")
    if shape is None and not datasets:
        raise SpecError("example_input_shape is required when no dataset gives the input shape")
    architecture = _json_arg(args.architecture) or spec.get("architecture")
    from worker.compression.pipeline import JobRequest, ModelRef, StageSpec  # torch: only once the spec is valid

    return JobRequest(
        model=ModelRef(path=str(model_path), format=model_format, architecture=architecture),
        stages=[StageSpec(v.spec.method, v.spec.name, dict(v.options)) for v in validated],
        artifact_path=str(artifact_path), example_input_shape=shape,
        dataset_path=datasets.get("dataset", (None,))[0], eval_dataset_path=datasets.get("eval_dataset", (None,))[0],
        device=device, output_format=spec.get("output_format"), seed=int(spec.get("seed", 0)),
        threads=int(target.get("threads", 1)))


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
            error = outcome.error or {"error": "Unknown", "detail": "the job ended without a result"}
            err.print(f"[red]error:[/red] {error.get('detail') or error.get('error')}")
            return 1
        result = outcome.result
        assert result is not None
        artifact.replace(target)
    metrics = result["metrics"]
    report = _local_report(args, spec, result, events)
    if args.json:
        _print_json({"metrics": metrics, "artifact_format": result["artifact_format"],
                     "artifact": str(target), "requires": result.get("requires", []), "report": str(report)})
    else:
        print_result(metrics, target, f"{Path(args.model).name}: local run ({result['artifact_format']})")
        out.print(f"report: {report}", soft_wrap=True)
    return 0


def _local_report(args: argparse.Namespace, spec: dict[str, Any], result: dict[str, Any],
                  events: list[tuple[str, dict[str, Any]]]) -> Path:
    """The same HTML report the server writes, from this run's metrics and events."""
    from app.report import report_html

    target = Path(args.report or default_report_path(args.out))
    job = {"id": "local run", "status": "succeeded", "spec": spec, "metrics": result["metrics"],
           "artifact": {"format": result["artifact_format"], "requires": result.get("requires", [])}}
    target.write_text(report_html(job, events), encoding="utf-8")
    return target


def _run_local_child(request: Any, scratch: Path, events: list[tuple[str, dict[str, Any]]]) -> Any:
    """Run the job like the service does, in a child process, so a native crash of the model's
    code (a segfault, an abort) ends the child with a message here, not this process.

    The limits are the user's machine's own (no caps): the child is for survival, not for
    distrust of a model the user runs on their own machine anyway.
    """
    import dataclasses
    import resource

    from worker.sandbox import Limits, run_sandboxed

    unlimited = resource.RLIM_INFINITY
    # the CPU limit's hard cap is soft + 5 s, so "unlimited" is a very large number there
    limits = Limits(memory_bytes=unlimited, cpu_seconds=10**9, file_bytes=unlimited, open_files=4096,
                    wall_seconds=7 * 24 * 3600.0, threads=max(1, request.threads))
    with progress_bar("local") as update:
        def on_message(message: dict[str, Any]) -> None:
            if message.get("type") == "progress":
                update(float(message["fraction"]), str(message["stage"]))
            elif message.get("type") == "event":
                events.append((str(message.get("kind")), message.get("data") or {}))
                update.log(f"{message.get('kind')}: {json.dumps(message.get('data'))}")

        # no namespaces here: it is the user's own model on the user's own machine (which may lack bubblewrap)
        outcome = run_sandboxed("job", dataclasses.asdict(request), scratch, limits, on_message=on_message,
                                isolation="none")
        if outcome.ok:
            update(1.0, "done")
    return outcome


def _cmd_compress(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.local:
        for key in SPEC_ID_KEYS:
            spec.pop(key, None)
        return _compress_local(args, spec)
    return _compress_server(args, spec)


# ---------------------------------------------------------------- wiring


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ClientError as error:
            return _fail(error)
        except (OSError, json.JSONDecodeError) as error:
            return _fail(error)

    return run


def add_client_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=None, help="server URL (env MODELPRESS_URL, default http://127.0.0.1:8000)")
    conn.add_argument("--api-key", default=None, help="API key (env MODELPRESS_API_KEY)")
    conn.add_argument("--json", action="store_true", help="print JSON instead of tables")

    def command(parent: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],  # type: ignore[type-arg]
                help: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help, parents=[conn])
        parser.set_defaults(func=_guard(func))
        return parser

    models = sub.add_parser("models", help="upload and list models").add_subparsers(dest="models_command",
                                                                                    required=True)
    p = command(models, "upload", _cmd_models_upload, "upload a model file")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--format", choices=["torchscript", "state_dict", "safetensors", "exported_program"])
    p.add_argument("--architecture", help='JSON (or a JSON file): {"name": "mlp", "kwargs": {...}}')
    p = command(models, "list", _cmd_models_list, "list models")
    p.add_argument("--limit", type=int, default=50)

    datasets = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(dest="datasets_command",
                                                                                          required=True)
    p = command(datasets, "upload", _cmd_datasets_upload, "upload an .npz or .safetensors dataset")
    p.add_argument("file")
    p.add_argument("--name")
    p = command(datasets, "list", _cmd_datasets_list, "list datasets")
    p.add_argument("--limit", type=int, default=50)

    jobs = sub.add_parser("jobs", help="submit, list, show, cancel and watch jobs").add_subparsers(
        dest="jobs_command", required=True)
    p = command(jobs, "submit", _cmd_jobs_submit, "submit a job from a YAML or JSON spec")
    p.add_argument("--spec", required=True, help="JobSpec body in YAML or JSON")
    p.add_argument("--model", help="model id (overrides model_id in the spec)")
    p.add_argument("--dataset", help="dataset id")
    p.add_argument("--eval-dataset", help="eval dataset id")
    p.add_argument("--idempotency-key", help="default: a fresh uuid4")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p = command(jobs, "list", _cmd_jobs_list, "list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--method")
    p.add_argument("--model", help="model id")
    p.add_argument("--limit", type=int, default=50)
    p = command(jobs, "show", _cmd_jobs_show, "show a job with its metrics")
    p.add_argument("job_id")
    p = command(jobs, "cancel", _cmd_jobs_cancel, "cancel a job")
    p.add_argument("job_id")
    p = command(jobs, "watch", _cmd_jobs_watch, "follow a job's live events until it ends")
    p.add_argument("job_id")
    p = command(jobs, "report", _cmd_jobs_report, "save the job's self-contained HTML report (charts included)")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", help="where to write it (default: JOB-report.html)")
    p.add_argument("--open", action="store_true", help="open it in the web browser")

    p = command(sub, "compress", _cmd_compress,
                "one shot: upload, compress, download, and print a before/after table (--local: no server)")
    p.add_argument("model", metavar="MODEL", help="model file (or, without --local, an uploaded model id)")
    p.add_argument("--spec", required=True, help="JobSpec body in YAML or JSON, without model/dataset ids")
    p.add_argument("--out", required=True, help="where to write the compressed model")
    p.add_argument("--report", help="where to write the HTML report (default: beside --out, NAME.report.html)")
    p.add_argument("--dataset", help="calibration / training data: a file (or, without --local, a dataset id)")
    p.add_argument("--eval-dataset", help="held-out data for accuracy: a file (or a dataset id)")
    p.add_argument("--local", action="store_true", help="run the engine in this process; no server")
    p.add_argument("--name", help="name of the uploaded model")
    p.add_argument("--format", choices=["torchscript", "state_dict", "safetensors", "exported_program"],
                   help="model format (detected when absent)")
    p.add_argument("--architecture", help="for weight-only formats: JSON or a JSON file")
