"""Distributed training in one place: torchrun's environment, local launching, rank-0 gating.

One command serves three ways of running:

- ``gsd-wsi pretrain ... --nproc N`` starts N local processes itself (:func:`launch`);
- ``torchrun --nproc-per-node N -m gsd_wsi pretrain ...`` (single or multi-node) sets
  RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which :func:`init_distributed` reads;
- a plain single process.

gloo on CPU, NCCL on GPU. Only rank 0 logs progress and writes files.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from gsd_wsi.errors import ConfigError, GsdWsiError

logger = logging.getLogger(__name__)

DevicePref = Literal["auto", "cpu", "cuda"]
_TIMEOUT = dt.timedelta(minutes=30)


class WorkerProcessError(GsdWsiError, RuntimeError):
    """A training process started by --nproc failed; the message is its error."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: DevicePref) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse more local processes than devices (GPUs, or CPU cores)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} is more than the {torch.cuda.device_count()} GPU(s) torch sees")
    if device.type == "cpu" and nproc > (os.cpu_count() or 1):
        raise ConfigError(f"--nproc {nproc} is more than the {os.cpu_count()} CPU cores of this machine")


def init_distributed(pref: DevicePref = "auto") -> DistContext:
    """Join the process group torchrun (or :func:`launch`) described in the environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(pref)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    if device.type == "cpu" and world_size > 1:
        # Each rank gets an equal share of the cores; oversubscribing threads slows all.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    return DistContext(rank, local_rank, world_size, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(local_rank: int, nproc: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({
        "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    fn(*args)


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes that form one process group.

    Inside torchrun (WORLD_SIZE already set) or with ``nproc == 1``, runs ``fn`` here.
    """
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        fn(*args)
        return
    try:
        torch_mp.start_processes(_entry, args=(nproc, _free_port(), fn, args), nprocs=nproc, join=True,
                                 start_method="spawn")
    except torch_mp.ProcessRaisedException as exc:
        # The child's traceback arrives as text; its last line is the error a user needs.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise WorkerProcessError(f"training process {exc.error_index} failed: {lines[-1]}") from None
    except torch_mp.ProcessExitedException as exc:
        raise WorkerProcessError(f"training process {exc.error_index} died ({exc}); resume with --resume") from None
