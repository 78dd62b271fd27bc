"""The `modelpress` command: serve, worker, migrate, keys, and client commands."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from modelpress.extras import require_extra

Command = Callable[[argparse.Namespace], int]


def needs_extra(extra: str, command: Command) -> Command:
    """The command, run only when the extra it imports is installed (else a one-line install hint, exit 2)."""

    def run(args: argparse.Namespace) -> int:
        if not require_extra(extra, f"`modelpress {args.command}`"):
            return 2
        return command(args)

    return run


def _cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import downgrade, upgrade

    if args.downgrade:
        downgrade(revision=args.downgrade)
    else:
        upgrade()
    print("database migrated")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.auth import create_key, revoke_key
    from app.db import session_scope
    from app.migrate import upgrade
    from app.tables import ApiKey, Tenant

    upgrade()
    with session_scope() as session:
        if args.keys_command == "create":
            record, plain = create_key(session, tenant_name=args.tenant)
            print(f"created key {record.id} for tenant {args.tenant!r}; it is shown once:")
            print(plain)
        elif args.keys_command == "list":
            rows = session.execute(
                select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
            ).all()
            for key, tenant_name in rows:
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.id}\t{tenant_name}\t{key.prefix}…\t{state}\t{key.created_at:%Y-%m-%d %H:%M}")
        elif args.keys_command == "revoke":
            if not revoke_key(session, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    return 0


def worker_command(queues: str, concurrency: int, pool: str = "prefork") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        "INFO",
        "-E",
        "--without-mingle",
        "--without-gossip",
    ]


def _cmd_worker(args: argparse.Namespace) -> int:
    os.environ["MODELPRESS_WORKER_QUEUES"] = args.queues
    return subprocess.call(worker_command(args.queues, args.concurrency, args.pool))


def _terminate_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedWorker:
    """The worker of `serve --embedded-worker`, restarted if it dies.

    kombu's file-system transport can read a half-written message and stop the worker with an
    unrecoverable error; in embedded mode nobody else would start it again.
    """

    CHECK_S = 2.0

    def __init__(self) -> None:
        self.env = dict(os.environ, MODELPRESS_WORKER_QUEUES="cpu")
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.restarts = 0

    def _spawn(self) -> None:
        # the worker gets SIGTERM when this process dies, however it dies (uvicorn re-raises
        # the signal that stopped it, so a finally block alone is not enough)
        self.process = subprocess.Popen(worker_command("cpu", 1), env=self.env, preexec_fn=_terminate_with_parent)

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name="embedded-worker-supervisor", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(self.CHECK_S):
            if self.process is not None and self.process.poll() is not None and not self.stopping.is_set():
                self.restarts += 1
                print(
                    f"embedded worker exited with {self.process.returncode}; restarting (restart {self.restarts})",
                    file=sys.stderr,
                    flush=True,
                )
                self._spawn()

    def stop(self) -> None:
        self.stopping.set()
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.migrate import upgrade
    from app.observability import configure_logging

    upgrade()
    configure_logging()
    supervisor: EmbeddedWorker | None = None
    if args.embedded_worker:
        supervisor = EmbeddedWorker()
        supervisor.start()
    print(
        f"ModelPress API on http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.port} "
        f"(docs at /docs, dashboard at /ui)",
        flush=True,
    )
    try:
        uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="warning", workers=args.workers)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from app.config import get_settings
    from app.retention import remove_expired_artifacts

    days = args.older_than_days if args.older_than_days is not None else get_settings().artifact_retention_days
    if days is None:
        print("no retention set: pass --older-than-days or set MODELPRESS_ARTIFACT_RETENTION_DAYS", file=sys.stderr)
        return 2
    print(f"removed {remove_expired_artifacts(days)} artifacts of jobs finished more than {days} days ago")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API (optionally with an embedded worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--embedded-worker", action="store_true", help="also start a worker process")
    serve.add_argument("--workers", type=int, default=1, help="API processes (one per core in production)")
    serve.set_defaults(func=needs_extra("server", _cmd_serve))

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--pool", default="prefork")
    worker.set_defaults(func=needs_extra("worker", _cmd_worker))

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--downgrade", metavar="REVISION")
    migrate.set_defaults(func=needs_extra("server", _cmd_migrate))

    cleanup = sub.add_parser("cleanup", help="remove artifacts past their retention")
    cleanup.add_argument("--older-than-days", type=int)
    cleanup.set_defaults(func=needs_extra("server", _cmd_cleanup))

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it as the last line")
    create.add_argument("--tenant", required=True)
    keys_sub.add_parser("list", help="list keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    keys.set_defaults(func=needs_extra("server", _cmd_keys))

    from modelpress.client_cli import add_client_commands

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
