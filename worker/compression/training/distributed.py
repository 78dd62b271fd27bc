"""Data-parallel training: `_train` in `devices` processes with DistributedDataParallel (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import copy
import multiprocessing
import os
import queue as queue_module
import socket
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from worker.compression.base import EngineError, JobCancelled, StageContext
from worker.compression.training.evaluation import set_training_mode
from worker.compression.training.loop import _Job, _train


class _CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class _QueueReporter:
    """What a rank reports: rank 0 forwards progress and events to the parent; all share the cancel flag."""

    def __init__(self, rank: int, messages: Any, cancelled: _CancelFlag) -> None:
        self.rank, self.messages, self.cancelled = rank, messages, cancelled

    def progress(self, fraction: float, message: str) -> None:
        if self.rank == 0:
            self.messages.put(("progress", fraction, message))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if self.rank == 0:
            self.messages.put(("event", kind, data))

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled()


def _fit_distributed(job: _Job, ctx: StageContext) -> dict[str, Any]:
    """Run `_train` in `devices` processes with DDP; relay their reports and the cancellation."""
    world_size = job.config.devices
    device = torch.device(job.device)
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if available < world_size:
            raise EngineError(f"train.devices is {world_size} but this worker has {available} CUDA device(s)")
        # CUDA cannot be forked: the job goes to fresh processes, so it must pickle.
        start_method = "spawn"
        try:
            import pickle

            pickle.dumps(job)
        except Exception as error:
            raise EngineError(f"data-parallel CUDA training needs a picklable model and loss: {error}") from error
    else:
        # Forked ranks share the parent's objects (closures, graph modules) without pickling.
        start_method = "fork"
    mp_context = multiprocessing.get_context(start_method)
    messages = mp_context.Queue()
    cancelled = mp_context.Event()
    with tempfile.TemporaryDirectory(prefix="modelpress-ddp-") as folder:
        result_path = Path(folder) / "result.pt"
        port = _free_port()
        from torch.multiprocessing.spawn import ProcessException, start_processes

        processes = start_processes(  # type: ignore[no-untyped-call]  # torch leaves this unannotated
            _distributed_worker,
            args=(world_size, port, job, messages, cancelled, str(result_path)),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        was_cancelled = False
        try:
            while True:
                done = processes.join(timeout=0.2)
                _relay(messages, ctx)
                if done:
                    break
                if not was_cancelled:
                    try:
                        ctx.check_cancelled()
                    except JobCancelled:
                        was_cancelled = True
                        cancelled.set()
        except ProcessException as error:  # a rank raised, or died (e.g. out of memory)
            last_line = str(error).strip().splitlines()[-1]
            raise EngineError(f"data-parallel training failed: {last_line}") from error
        finally:
            for process in processes.processes:
                if process.is_alive():
                    process.terminate()
        if was_cancelled or not result_path.exists():
            raise JobCancelled()
        result = torch.load(result_path, weights_only=True)
    job.model.load_state_dict(result["state_dict"])
    set_training_mode(job.model, False)
    summary: dict[str, Any] = result["summary"]
    return summary


def _distributed_worker(
    rank: int, world_size: int, port: int, job: _Job, messages: Any, cancelled: _CancelFlag, result_path: str
) -> None:
    import torch.distributed as dist

    device = torch.device(job.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        rank_job = _replace_job(job, device)
        summary = _train(rank_job, _QueueReporter(rank, messages, cancelled), rank=rank, world_size=world_size)
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in job.model.state_dict().items()}
            torch.save({"state_dict": state, "summary": summary}, result_path)
    except JobCancelled:
        return
    finally:
        dist.destroy_process_group()


def _relay(messages: Any, ctx: StageContext) -> None:
    while True:
        try:
            message = messages.get_nowait()
        except queue_module.Empty:
            return
        if message[0] == "progress":
            ctx.progress(message[1], message[2])
        else:
            ctx.event(message[1], message[2])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _replace_job(job: _Job, device: torch.device) -> _Job:
    replaced = copy.copy(job)
    replaced.device = device
    return replaced
