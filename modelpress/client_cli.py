"""Client-side CLI commands: models, datasets, jobs, and the one-shot `compress`.

`compress` talks to a server (upload, submit, live progress, download, before/after table),
or with `--local` runs the same spec with the engine in a child process, no server at all
(modelpress/cli_local.py; tables and printing are in modelpress/cli_output.py).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from modelpress.cli_output import (
    _fail,
    _job_row,
    _print_json,
    err,
    human_bytes,
    metrics_table,
    out,
    print_result,
    progress_bar,
)
from modelpress.client import Client, ClientError, Job
from modelpress.job_status import JobStatus

SPEC_ID_KEYS = ("model_id", "dataset_id", "eval_dataset_id")


# ---------------------------------------------------------------- helpers


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("MODELPRESS_API_KEY")
    if not key:
        raise SystemExit(
            "error: no API key: pass --api-key or set MODELPRESS_API_KEY "
            "(create one with `modelpress keys create --tenant NAME`)"
        )
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


# ---------------------------------------------------------------- models and datasets


def _cmd_models_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.upload_model(
            args.file, name=args.name, format=args.format, architecture=_json_arg(args.architecture)
        )
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
    return 0 if job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED) else 1


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
    print(f"{job.id}\t{job.status}" + ("\t(cancel requested)" if job.status == JobStatus.RUNNING else ""))
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
    return 0 if job.status == JobStatus.SUCCEEDED else 1


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
            model = client.upload_model(
                args.model, name=args.name, format=args.format, architecture=_json_arg(args.architecture)
            )
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
        if job.status != JobStatus.SUCCEEDED:
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


def _cmd_compress(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.local:
        from modelpress.cli_local import _compress_local  # the engine path, loaded only for --local
        from modelpress.extras import require_extra

        if not require_extra("local", "`modelpress compress --local`"):
            return 2
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

    def command(
        parent: argparse._SubParsersAction,  # type: ignore[type-arg]
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help, parents=[conn])
        parser.set_defaults(func=_guard(func))
        return parser

    models = sub.add_parser("models", help="upload and list models").add_subparsers(
        dest="models_command", required=True
    )
    p = command(models, "upload", _cmd_models_upload, "upload a model file")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--format", choices=["torchscript", "state_dict", "safetensors", "exported_program", "huggingface"])
    p.add_argument("--architecture", help='JSON (or a JSON file): {"name": "mlp", "kwargs": {...}}')
    p = command(models, "list", _cmd_models_list, "list models")
    p.add_argument("--limit", type=int, default=50)

    datasets = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(
        dest="datasets_command", required=True
    )
    p = command(datasets, "upload", _cmd_datasets_upload, "upload an .npz or .safetensors dataset")
    p.add_argument("file")
    p.add_argument("--name")
    p = command(datasets, "list", _cmd_datasets_list, "list datasets")
    p.add_argument("--limit", type=int, default=50)

    jobs = sub.add_parser("jobs", help="submit, list, show, cancel and watch jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    p = command(jobs, "submit", _cmd_jobs_submit, "submit a job from a YAML or JSON spec")
    p.add_argument("--spec", required=True, help="JobSpec body in YAML or JSON")
    p.add_argument("--model", help="model id (overrides model_id in the spec)")
    p.add_argument("--dataset", help="dataset id")
    p.add_argument("--eval-dataset", help="eval dataset id")
    p.add_argument("--idempotency-key", help="default: a fresh uuid4")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p = command(jobs, "list", _cmd_jobs_list, "list jobs, newest first")
    p.add_argument("--status", choices=[status.value for status in JobStatus])
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

    p = command(
        sub,
        "compress",
        _cmd_compress,
        "one shot: upload, compress, download, and print a before/after table (--local: no server)",
    )
    p.add_argument("model", metavar="MODEL", help="model file (or, without --local, an uploaded model id)")
    p.add_argument("--spec", required=True, help="JobSpec body in YAML or JSON, without model/dataset ids")
    p.add_argument("--out", required=True, help="where to write the compressed model")
    p.add_argument("--report", help="where to write the HTML report (default: beside --out, NAME.report.html)")
    p.add_argument("--dataset", help="calibration / training data: a file (or, without --local, a dataset id)")
    p.add_argument("--eval-dataset", help="held-out data for accuracy: a file (or a dataset id)")
    p.add_argument("--local", action="store_true", help="run the engine in this process; no server")
    p.add_argument("--name", help="name of the uploaded model")
    p.add_argument(
        "--format",
        choices=["torchscript", "state_dict", "safetensors", "exported_program", "huggingface"],
        help="model format (detected when absent)",
    )
    p.add_argument("--architecture", help="for weight-only formats: JSON or a JSON file")
