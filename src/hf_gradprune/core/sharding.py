"""FSDP2 shards: what masks, importance and selection need of a parameter that ``fully_shard`` split across
processes (a ``DTensor`` whose local shard holds a block of rows).

Every rank holds the whole masks (one byte per weight); scores and importance accumulators stay sharded like
their parameter, and the lowest ``k`` of sharded scores are found without gathering them
(:func:`lowest_across_shards`), with the same result as one process on the whole tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

_SIGN = 0x7FFFFFFF


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter of a ``fully_shard`` model, or a score of one)."""
    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a sharded one gathered whole on every rank."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def reshard(model: nn.Module, refresh: bool = False) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward without backward (the root module's, by
    default): the next forward gathers them again, with the ``requires_grad`` and values of the shards.

    ``refresh``: gather each module's parameters once first, which makes FSDP2 read their ``requires_grad``
    and dtypes again. It reads them at the model's first forward to set up mixed precision; when that forward
    ran with every parameter frozen (a pruning probe), a module's gradients would otherwise stay in the
    compute dtype (bf16) and training would fail to store them in its float32 parameters.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if refresh:
                module.unshard()
            module.reshard()


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The part of ``full`` (of ``like``'s shape, the same on every rank) that ``like``'s local shard holds;
    no communication."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def shard_like(local: torch.Tensor, like: DTensor) -> DTensor:
    """``local``, this rank's shard of a tensor of ``like``'s shape, as a ``DTensor`` sharded like it."""
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
    )


def replicate_like(tensor: torch.Tensor, like: DTensor) -> DTensor:
    """``tensor`` (the same on every rank) as a replicated ``DTensor`` on ``like``'s mesh."""
    return DTensor.from_local(
        tensor, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False
    )


def sum_into_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The sum over processes of ``full`` (each process's own tensor of ``like``'s shape), only the part that
    ``like``'s local shard holds: one reduce-scatter."""
    mesh = like.device_mesh
    partial = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False)
    return partial.redistribute(mesh, like.placements).to_local()


def row_shard_group(tensor: DTensor) -> dist.ProcessGroup | None:
    """The process group across which ``tensor`` is split by blocks of rows (``Shard(0)`` on one mesh
    dimension, replicated on any other), or ``None`` for any other layout."""
    sharded = [d for d, p in enumerate(tensor.placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or tensor.placements[sharded[0]] != Shard(0):
        return None
    return tensor.device_mesh.get_group(sharded[0])


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 ``values`` are (no NaN)."""
    bits = values.view(torch.int32)
    return torch.where(bits < 0, -(bits & _SIGN) - 1, bits)


def _value_of_key(key: int) -> float:
    bits = key if key >= 0 else -(key + 1) - 2**31
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _sum_over(group: dist.ProcessGroup, value: int) -> int:
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total, group=group)
    return int(total)


def lowest_across_shards(
    shards: Sequence[torch.Tensor], count: int, group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Bool masks of the ``count`` smallest entries of several tensors taken together, each split by rows
    across ``group`` (this rank's float32 shards ``shards``, no NaN): ties go to the earlier entry of the
    tensors flattened in order, as one process taking the whole tensors would.

    The ``count``-th value is found by bisection on the values' bits (32 all-reduces of one count); the
    shards are never gathered.
    """
    if count == 0:
        return [torch.zeros_like(shard, dtype=torch.bool) for shard in shards]
    keys = [_keys(shard) for shard in shards]
    low, high = -(2**31), 2**31 - 1
    while low < high:  # the smallest key with at least `count` entries at or below it
        middle = (low + high) // 2
        if _sum_over(group, sum(int((k <= middle).sum()) for k in keys)) >= count:
            high = middle
        else:
            low = middle + 1
    del keys
    threshold = _value_of_key(low)
    lowest = [shard < threshold for shard in shards]
    ties = [(shard == threshold).flatten() for shard in shards]
    wanted = count - _sum_over(group, sum(int(mask.sum()) for mask in lowest))
    counts = torch.tensor([int(tie.sum()) for tie in ties], dtype=torch.int64)
    every = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, counts, group=group)
    table = torch.stack(every)  # rank (rows in order) x tensor
    rank = dist.get_rank(group)
    before = 0
    for index, (mask, tie) in enumerate(zip(lowest, ties, strict=True)):
        before += int(table[:rank, index].sum())
        take = max(0, min(wanted - before, int(table[rank, index])))
        mask.view(-1)[tie.nonzero().squeeze(1)[:take]] = True
        before += int(table[rank:, index].sum())
    return lowest


def rows_group(tensors: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group splitting every one of ``tensors`` by rows (FSDP2), ``None`` when none is sharded;
    sharded tensors of any other layout are refused."""
    if not any(is_sharded(tensor) for tensor in tensors):
        return None
    groups = {row_shard_group(tensor) if is_sharded(tensor) else None for tensor in tensors}
    if len(groups) != 1 or None in groups:
        raise ValueError(
            "Sharded scores must all be split by rows over one process group (FSDP2's `fully_shard`), "
            "with no whole tensor among them."
        )
    return groups.pop()


def kept_above_lowest(
    tensors: Sequence[DTensor],
    count: int,
    group: dist.ProcessGroup,
    prepare: Callable[[torch.Tensor], torch.Tensor],
) -> list[DTensor]:
    """Keep-masks, sharded like ``tensors``, that drop the ``count`` lowest entries of ``prepare`` of their
    local shards taken together (:func:`lowest_across_shards`): no tensor is gathered."""
    lowest = lowest_across_shards([prepare(tensor.to_local()) for tensor in tensors], count, group)
    return [shard_like(low.logical_not(), tensor) for low, tensor in zip(lowest, tensors, strict=True)]


def on_rows(
    compute: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor, rows_whole: bool
) -> torch.Tensor:
    """``compute(tensor)`` of a row-by-row result (a per-row or N:M mask): a tensor sharded by rows whose rows
    are whole (``rows_whole``: no input axis is split) is computed shard by shard, with no communication;
    any other sharded tensor is gathered, computed and split again."""
    if not is_sharded(tensor):
        return compute(tensor)
    if rows_whole and row_shard_group(tensor) is not None:
        return shard_like(compute(tensor.to_local()), tensor)
    return shard_of(compute(tensor.full_tensor()), tensor)


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) sharded as ``like`` is, when ``like`` is sharded and ``full`` not;
    otherwise ``full`` itself."""
    if not is_sharded(like) or is_sharded(full):
        return full
    return shard_like(local_part(full.to(like.device), like), like)
