"""Real gloo process groups for the tests: free ports, and ranks spawned, joined and cleaned up.

A worker is ``worker(rank, world, port, out_dir)``: it joins the group at
``tcp://127.0.0.1:port`` and saves its results under ``out_dir``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessContext, start_processes

# A rank waiting longer than this for the others has lost them: fail, not hang.
GLOO_TIMEOUT = timedelta(seconds=60)


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join the gloo group of ``world`` ranks at ``tcp://127.0.0.1:port`` (in a worker)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GLOO_TIMEOUT,
    )


def free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 now (held together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_ranks(worker: Callable[..., Any], world: int, port: int, out_dir: str) -> ProcessContext:
    """``world`` spawned processes running ``worker``, not yet joined."""
    context: ProcessContext = start_processes(  # type: ignore[no-untyped-call]
        worker, args=(world, port, out_dir), nprocs=world, join=False, start_method="spawn"
    )
    return context


def join_ranks(*runs: ProcessContext) -> None:
    """Wait for every run; a rank that failed raises here with its traceback.

    Whatever still runs afterwards (the other ranks of a failed run) is terminated.
    """
    try:
        for run in runs:
            while not run.join():
                pass
    finally:
        for run in runs:
            for process in run.processes:
                if process.is_alive():
                    process.terminate()


def run_ranks(worker: Callable[..., Any], world: int, out_dir: str) -> None:
    """Spawn ``world`` ranks of ``worker`` on a free port and wait for them all."""
    (port,) = free_ports(1)
    join_ranks(start_ranks(worker, world, port, out_dir))


def count_all_reduces(model: Any) -> list[int]:
    """A one-element counter of the gradient buckets ``model`` (DDP) all-reduces from now on."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls = [0]

    # Unannotated: DDP checks a hook's annotations at run time, and these
    # would be strings here.
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    return calls
