"""Running the bundle under ``torchrun``: the process group, the device of a rank, and how work is shared out.

Everything here is PyTorch's own ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) started from the environment
that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` or its rendezvous).
Without a process group every helper is the single-process case (rank 0 of 1, barriers do nothing), so
``configs/train.json`` and ``configs/inference.json`` carry the rank-aware logic and the overlay
``configs/multi_gpu_train.json`` only starts the group, picks the device and wraps the network in
``DistributedDataParallel``.

What is shared out, and how:

* training batches: :class:`s2l_monai.data.seeding.EpochSeededSampler` (PyTorch's ``DistributedSampler``);
* the EMA ensemble and inference: :class:`ShardSampler`, every item on exactly one rank and all the slices of a
  volume on the same rank (``DistributedSampler`` pads the list with repeated items, which would fold an item into
  its average twice, and splits a volume's slices, whose store entry is one file);
* inference of a volume whose outputs several processes can write into (OME-Zarr: one file per chunk): with a
  ``split_key`` the sampler cuts its slices into contiguous blocks aligned to the output's chunk rows
  (:func:`chunk_blocks`, :func:`volume_shares`), block ``r`` on rank ``r``, and
  :class:`s2l_monai.volumes.SaveVolumeSliced` writes every rank's chunks into one store. TIFF, NIfTI and ITK
  outputs are one file that one process encodes: their volumes stay whole on one rank.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "ShardSampler",
    "VolumeShare",
    "all_gather_objects",
    "all_reduce",
    "barrier",
    "chunk_blocks",
    "destroy_process_group",
    "init_process_group",
    "is_distributed",
    "is_main_process",
    "local_device",
    "require_process_group",
    "require_single_process",
    "rank",
    "shard_indices",
    "volume_shares",
    "world_size",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else ``torchrun``'s ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


_current_rank = rank  # for the samplers, whose ``rank`` argument hides the function


def world_size() -> int:
    """Processes in the run: from the process group, else ``torchrun``'s ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0, the process that logs, draws and writes checkpoints (always True in a single process)."""
    return rank() == 0


def local_device(device: str | torch.device | None = None) -> torch.device:
    """The device of this process: ``cuda:<LOCAL_RANK>`` where CUDA is available, else the CPU.

    Args:
        device: an explicit choice (returned as is), e.g. to run a multi-process run on CPUs of a GPU machine.
    """
    if device not in (None, "", "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
    return torch.device("cpu")


def init_process_group(backend: str | None = "auto", timeout_minutes: float = 30.0) -> bool:
    """Start the process group from ``torchrun``'s environment, once; nothing where ``WORLD_SIZE`` is unset or 1.

    Args:
        backend: ``"nccl"``, ``"gloo"``, or ``"auto"``: NCCL where CUDA is available, gloo otherwise.
        timeout_minutes: how long a collective (e.g. the barrier after an ensemble) may wait for the other ranks.

    Returns:
        whether a group with more than one process is running afterwards.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if backend in (None, "", "auto"):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=float(timeout_minutes)))
    # Ignite joins the group lazily, with a collective (new_group), on its first distributed query; rank-0-only
    # handlers (checkpoint savers) would make that query on rank 0 alone and wait forever: join now, on every rank
    import ignite.distributed as idist

    idist.sync()
    if is_main_process():
        logger.info(f"torch.distributed: {dist.get_world_size()} processes, backend {backend}")
    else:
        logging.disable(logging.INFO)  # one log: rank 0's (warnings and errors of every rank still show)
    return True


def require_process_group(overlay: str = "configs/multi_gpu_train.json") -> None:
    """Stop a run that ``torchrun`` started with several processes but without a process group.

    Without one every process would train alone on the whole data set and they would overwrite each other's
    files; the overlay ``overlay`` starts the group.
    """
    if world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"started by torchrun with WORLD_SIZE={world_size()} but without a process group: add the overlay, "
            f"--config_file \"['configs/train.json','{overlay}']\""
        )


def require_single_process(what: str = "evaluation") -> None:
    """Stop ``what`` (which writes one table from every item) when ``torchrun`` started several processes."""
    if world_size() > 1:
        raise RuntimeError(
            f"{what} writes one table over every item and runs in one process: start it without torchrun (sharded "
            "inference, configs/multi_gpu_inference.json, writes the predictions; `s2l evaluate --pred` scores them)"
        )


def destroy_process_group() -> None:
    """End the process group (the bundle's ``finalize``); nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where the backend wants collective tensors: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Reduce a few numbers over the ranks (``"sum"`` or ``"max"``); the values themselves in a single process."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in tensor.cpu()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(network: torch.nn.Module, device: str | torch.device | None = None, **kwargs: Any) -> torch.nn.Module:
    """``DistributedDataParallel(network)`` in a process group, the network itself otherwise.

    The bundle gives the wrapper to the trainer only: the EMA ensemble and checkpoints use the plain network (each
    rank predicts its own items, which a DDP forward would try to keep in step).
    """
    if not is_distributed():
        return network
    device = torch.device(device) if device is not None else next(network.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, **kwargs)


def _group_key(item: Any, group_key: str, slice_key: str) -> Any:
    if isinstance(item, Mapping) and item.get(slice_key) is not None:
        return item.get(group_key, item.get("image"))
    return None


def chunk_blocks(num_slices: int, extent: int, num_replicas: int) -> list[tuple[int, int]]:
    """Cut slices ``0..num_slices-1`` into one contiguous block per rank, aligned to rows of ``extent`` slices.

    The rows of chunks along the slice axis (``ceil(num_slices / extent)``, the last one possibly shorter) are
    shared out in order as evenly as they go, the first ranks taking one more where they do not divide evenly
    (``numpy.array_split``'s rule); a rank left without a row gets an empty block ``(n, n)``. Every slice is in
    exactly one block and no chunk is in two, so each rank can write whole chunks of one store.

    Args:
        num_slices: slices of the volume along the slice axis.
        extent: the output's chunk extent along that axis.
        num_replicas: processes.

    Returns:
        ``[(start, stop), ...]``, one half-open block per rank, in rank order.

    Example::

        chunk_blocks(10, 3, 2) == [(0, 6), (6, 10)]  # rows 0-2, 3-5 | 6-8, 9
    """
    n, extent, replicas = int(num_slices), int(extent), int(num_replicas)
    if extent < 1 or replicas < 1 or n < 0:
        raise ValueError(f"need extent >= 1, num_replicas >= 1, num_slices >= 0; got {extent}, {replicas}, {n}")
    rows = math.ceil(n / extent)
    base, extra = divmod(rows, replicas)
    blocks, row = [], 0
    for r in range(replicas):
        stop_row = row + base + (1 if r < extra else 0)
        blocks.append((min(row * extent, n), min(stop_row * extent, n)))
        row = stop_row
    return blocks


@dataclass(frozen=True)
class VolumeShare:
    """A volume whose slices several ranks handle: block ``r`` of :attr:`blocks` on rank ``r``.

    Attributes:
        key: the volume's group key (its ``id``).
        image: the volume's ``image`` path, as the items give it.
        num_slices: slices along the slice axis.
        extent: the output's chunk extent along the slice axis (blocks are aligned to it).
        blocks: half-open slice ranges, one per rank (:func:`chunk_blocks`).
        counts: how many of the volume's slice items each rank handles.
    """

    key: Any
    image: str
    num_slices: int
    extent: int
    blocks: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]


def volume_shares(
    items: Sequence[Any],
    num_replicas: int | None = None,
    group_key: str = "id",
    slice_key: str = "slice",
    split_key: str | None = None,
) -> dict[Any, VolumeShare]:
    """The volumes of ``items`` whose slices are split across ranks, by group key (empty in a single process).

    A volume is split when its slice items carry ``split_key``: the extent of its output's chunks along the slice
    axis, which :func:`s2l_monai.volumes.slice_items` sets (``block_key``) only for formats several processes can
    write into (OME-Zarr). Its slices are cut by :func:`chunk_blocks`; a volume of one chunk row is not split (it
    is dealt out whole, like any other unit, which keeps many small volumes spread over the ranks).

    Args:
        items: the data list.
        num_replicas: processes (default: :func:`world_size`).
        group_key: key naming the volume of a slice item.
        slice_key: key of a slice item's index.
        split_key: key of the chunk extent; None splits nothing.
    """
    n = world_size() if num_replicas is None else int(num_replicas)
    if n <= 1 or not split_key:
        return {}
    found: dict[Any, tuple[Mapping, list[int]]] = {}
    for item in items:
        key = _group_key(item, group_key, slice_key)
        if key is None or not item.get(split_key):
            continue
        found.setdefault(key, (item, []))[1].append(int(item[slice_key]))
    shares: dict[Any, VolumeShare] = {}
    for key, (first, slices) in found.items():
        extent = int(first[split_key])
        num_slices = int(first.get("num_slices") or max(slices) + 1)
        if math.ceil(num_slices / extent) < 2:
            continue
        blocks = tuple(chunk_blocks(num_slices, extent, n))
        counts = tuple(sum(start <= k < stop for k in slices) for start, stop in blocks)
        shares[key] = VolumeShare(key, str(first.get("image")), num_slices, extent, blocks, counts)
    return shares


def shard_indices(
    items: Sequence[Any],
    num_replicas: int | None = None,
    rank_: int | None = None,
    group_key: str = "id",
    slice_key: str = "slice",
    split_key: str | None = None,
) -> list[int]:
    """The indices of ``items`` that one rank handles: every item on exactly one rank, a volume's slices together.

    Items are dealt out in their order, round robin; the slices of one volume (items with ``slice_key`` and the
    same ``group_key``, see :func:`s2l_monai.volumes.slice_items`) count as one unit, so a volume's store entry and
    output files are written by one process. No item is repeated (unlike ``DistributedSampler``), so shares may
    differ by one unit.

    With ``split_key`` (inference), a volume whose items carry it is split instead: rank ``r`` takes the slices of
    block ``r`` of :func:`volume_shares` (contiguous, aligned to the output's chunk rows), so all ranks write their
    own chunks of the same OME-Zarr outputs. Volumes without the key (TIFF, NIfTI, ITK outputs: one file that one
    process encodes) stay whole.

    Args:
        items: the data list.
        num_replicas: processes (default: :func:`world_size`).
        rank_: this process's rank (default: :func:`rank`).
        group_key: key naming the volume of a slice item.
        slice_key: key of a slice item's index.
        split_key: key of a slice item's chunk extent (see :func:`volume_shares`); None keeps every volume whole.
    """
    n = world_size() if num_replicas is None else int(num_replicas)
    r = rank() if rank_ is None else int(rank_)
    if n <= 1:
        return list(range(len(items)))
    shares = volume_shares(items, n, group_key, slice_key, split_key)
    volumes: dict[Any, int] = {}  # volume -> its unit
    units = 0
    mine: list[int] = []
    for index, item in enumerate(items):
        key = _group_key(item, group_key, slice_key)
        if key is not None and key in shares:
            start, stop = shares[key].blocks[r]
            if start <= int(item[slice_key]) < stop:
                mine.append(index)
            continue
        if key is None or key not in volumes:
            unit, units = units, units + 1
            if key is not None:
                volumes[key] = unit
        else:
            unit = volumes[key]
        if unit % n == r:
            mine.append(index)
    return mine


class ShardSampler(Sampler[int]):
    """A sampler over this rank's share of a data list (:func:`shard_indices`), in the list's order.

    Args:
        data: the data list (or a dataset with a ``data`` attribute, e.g. MONAI's ``CacheDataset``).
        num_replicas: processes (default: the process group's size, or 1).
        rank: this process's rank (default: from the process group, or 0).
        group_key: key naming the volume of a slice item.
        slice_key: key of a slice item's index.
        split_key: key of a slice item's output chunk extent: volumes whose items carry it are split across the
            ranks in chunk-aligned blocks (inference into OME-Zarr, :func:`volume_shares`); None keeps them whole.

    Attributes:
        indices: this rank's indices into the data list.
        num_replicas: processes the list is shared among.
        rank: this process's rank.
        shares: the split volumes (:class:`VolumeShare`) by ``image`` path, which
            :class:`s2l_monai.volumes.SaveVolumeSliced` reads to know whose slices it writes.
    """

    def __init__(
        self,
        data: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        group_key: str = "id",
        slice_key: str = "slice",
        split_key: str | None = None,
    ) -> None:
        items = getattr(data, "data", data)
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = _current_rank() if rank is None else int(rank)
        self.indices = shard_indices(items, self.num_replicas, self.rank, group_key, slice_key, split_key)
        shares = volume_shares(items, self.num_replicas, group_key, slice_key, split_key)
        self.shares: dict[str, VolumeShare] = {share.image: share for share in shares.values()}

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
