"""Process groups of `python -m mmops train`: spawned workers (`--nproc N`) and torchrun launches.

`--nproc N` spawns N local processes (torch.multiprocessing, file:// rendezvous). Under torchrun the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) names the group, possibly across nodes,
and each process joins it with init_method="env://". Either way: gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
from datetime import timedelta
from typing import Callable

import torch

__all__ = ["TorchrunEnv", "torchrun_env", "init_torchrun", "end_spawned_worker", "spawn", "backend_for"]

# A collective that waits longer than this fails with gloo's timeout instead of hanging the run; every rank
# does the same work between collectives, so only a dead or stuck peer can take this long.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


class TorchrunEnv:
    """The variables torchrun (torch.distributed.run) sets for every process it starts."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank


def torchrun_env(environ=None) -> TorchrunEnv | None:
    """The torchrun environment of this process, or None when it was not started by torchrun (or another
    launcher that sets RANK and WORLD_SIZE). Raises ValueError when the variables are malformed."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK="
                         f"{env.get('LOCAL_RANK')!r}: expected integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return TorchrunEnv(rank, world, local_rank)


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def init_torchrun(env: TorchrunEnv, device: str) -> None:
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend_for(device), init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def end_spawned_worker(dist) -> None:
    """The success path's end of a spawned worker: wait for every rank (no rank tears its gloo connections down
    while another still runs), destroy the process group, and leave the process with os._exit(0). CI once saw a
    rank that had finished first abort in C++ (`terminate called without an active exception`, the message of a
    std::thread destroyed while joinable) after its work was done; torch's own reports of it come from teardown
    at interpreter exit, which os._exit skips. Everything a worker produces is written (and flushed) before.
    A worker that has already left the group (train's ranks do, before rank 0's evaluation and plots) skips
    the barrier: no rank waits for another's optional work."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned_worker(rank: int, world: int, init_file: str, device: str, fn: Callable, fn_args: tuple,
                    out_file: str) -> None:
    import threading

    import torch.distributed as dist
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing RLock, a named semaphore that only a normal interpreter exit
    # unregisters; os._exit (end_spawned_worker) skips that, and the resource tracker warned of leaked
    # semaphores at the end of every run. One bar per process needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend_for(device), init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        res = fn(*fn_args, rank=rank, world=world)
        if rank == 0:
            with open(out_file, "wb") as f:
                pickle.dump(res, f)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_spawned_worker(dist)


def spawn(fn: Callable, fn_args: tuple, nproc: int, device: str = "cpu"):
    """Runs fn(*fn_args, rank=r, world=nproc) in nproc spawned processes joined in one process group; returns
    rank 0's result. A rank that fails ends the others (torch.multiprocessing.spawn terminates them) and its
    exception is raised here."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pkl")
        mp.spawn(_spawned_worker, args=(nproc, os.path.join(d, "rendezvous"), device, fn, fn_args, out),
                 nprocs=nproc)
        with open(out, "rb") as f:
            return pickle.load(f)
