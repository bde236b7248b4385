"""Process group from the torchrun environment.

torchrun (torch.distributed.elastic) starts one worker per rank and exports::

    RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT

:func:`setup_distributed` reads them and opens the default process group with
``gloo`` on CPU or ``nccl`` on CUDA. Without torchrun (plain ``python train.py``)
it returns a one-process :class:`DistInfo` and opens no group, so the same train.py
runs both ways. :func:`cleanup_distributed` closes the group: a barrier, then
``destroy_process_group()``. Without it a gloo rank may abort in its atexit
handlers while the other rank is still tearing down its sockets, and torchrun then
reports a failure for a job that finished.

The helpers below (:func:`all_reduce_sum`, :func:`all_gather_object`,
:func:`broadcast_object`, :func:`barrier`) are no-ops, or identities, with one process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_distributed",
    "barrier",
    "all_reduce_sum",
    "all_gather_object",
    "broadcast_object",
    "restart_count",
]


@dataclass
class DistInfo:
    """Where this process stands in the job.

    Args:
      rank: global rank, 0 .. world_size-1.
      local_rank: rank on this node (selects the CUDA device).
      world_size: number of processes in the job.
      device: the device this rank computes on.
      backend: ``"gloo"``, ``"nccl"`` or None when no process group was opened.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes checkpoints and TensorBoard)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError("environment variable %s=%r is not an integer" % (name, v))


def is_distributed() -> bool:
    """True when a default process group with more than zero peers is open."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the process group, else ``RANK``, else 0."""
    if is_distributed():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """World size: from the process group, else ``WORLD_SIZE``, else 1."""
    if is_distributed():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    """``LOCAL_RANK`` (0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def restart_count() -> int:
    """How many times torchrun restarted this job (``TORCHELASTIC_RESTART_COUNT``)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                      timeout_s: float = 1800.0, single_process_group: bool = False) -> DistInfo:
    """Open the default process group from torchrun's environment.

    Args:
      device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). With CUDA the
        rank uses ``cuda:LOCAL_RANK``.
      backend: None picks ``nccl`` for CUDA and ``gloo`` for CPU.
      timeout_s: collective timeout.
      single_process_group: open the group under torchrun also when ``WORLD_SIZE`` is 1
        (so that the collectives really run, e.g. to check nccl on a single GPU).
    Returns:
      A :class:`DistInfo`. With ``WORLD_SIZE`` unset or 1 no group is opened
      (single process, ``backend`` None), unless one is already open or
      ``single_process_group`` is set under torchrun.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not (0 <= rank < world_size):
        raise ValueError("bad torchrun environment: RANK=%d WORLD_SIZE=%d" % (rank, world_size))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device %r requested but CUDA is not available" % device)
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if is_distributed():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev,
                        dist.get_backend())
    if world_size == 1 and not (single_process_group and "MASTER_ADDR" in os.environ):
        return DistInfo(0, local_rank, 1, dev, None)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError("WORLD_SIZE=%d but %s is not set: launch with torchrun"
                               % (world_size, name))
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = dict(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts (static rendezvous): keys that
        # the dead round's ranks wrote (e.g. gloo's listening addresses) would be read by
        # the new round and its ranks would connect to dead ports. A prefix per round
        # keeps every round's keys apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              world_size, is_master=False, timeout=timeout)
        kwargs["store"] = dist.PrefixStore("pkwrap/round%d" % restart_count(), store)
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, dev, backend)


def cleanup_distributed() -> None:
    """Barrier, then destroy the default process group (if one is open)."""
    if not is_distributed():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when distributed."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity with one process); returns ``t``."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> List[Any]:
    """Picklable ``obj`` of every rank, in rank order (``[obj]`` with one process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by rank ``src``, on every rank."""
    if not is_distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
