"""Samples spread over processes: which rows a process owns, and putting the rows back together.

A data module gives each process the samples ``rank, rank + world_size, ...`` (:func:`shard`); a
module that must hold every sample's result gathers the processes' rows (:func:`gather_rows`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """The sample indices process ``rank`` of ``world_size`` owns: ``rank, rank + world_size, ...``.

    Every index lands on exactly one process; shard sizes differ by at most one.
    """
    if n < world_size:
        raise ValueError(
            f"{n} samples cannot be shared by {world_size} processes; give at least num_samples={world_size} "
            "or run on fewer devices."
        )
    return torch.arange(rank, n, world_size)


def batch_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The rows ``index`` of every column of ``batch`` (tensors and per-sample lists)."""
    rows = index.tolist()
    return {key: value[index.to(value.device)] if isinstance(value, torch.Tensor)
            else [value[i] for i in rows] if isinstance(value, list) else value
            for key, value in batch.items()}


def condition_rows(cond: Any, index: Tensor) -> Any:
    """The conditioning of samples ``index`` (a tensor, or an indexable condition object)."""
    return cond[index.to(cond.device)] if isinstance(cond, Tensor) else cond[index]


def gather_rows(index: Tensor, rows: Tensor, n: int, world_size: int) -> Tensor:
    """Every process's ``rows`` (of samples ``index``, its shard) assembled into ``(n, ...)``."""
    if world_size == 1:
        out = rows.new_zeros((n, *rows.shape[1:]))
        out[index.to(rows.device)] = rows
        return out
    # shards differ in size by at most one: pad to the largest, gather, drop the padding
    size = -(-n // world_size)
    padded = rows.new_zeros((size, *rows.shape[1:]))
    padded[: len(rows)] = rows
    where = torch.full((size,), -1, dtype=torch.long, device=rows.device)
    where[: len(index)] = index.to(rows.device)
    all_rows = all_gather(padded).reshape(world_size * size, *rows.shape[1:])
    all_where = all_gather(where).reshape(-1)
    keep = all_where >= 0
    out = rows.new_zeros((n, *rows.shape[1:]))
    out[all_where[keep]] = all_rows[keep]
    return out


def all_gather(tensor: Tensor) -> Tensor:
    """``(world_size, *tensor.shape)``: every process's ``tensor`` (no autograd: results only)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
