"""The rows a data module holds: each evaluation row's index, seed and conditions, bounds on how
many, and a process's share of them in batches (used by :mod:`sdo_lightning.training.data`)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from sdo_lightning.training.rows import batch_rows, shard


def _per_sample(value: int | list[int] | None, n: int, fill: int) -> torch.Tensor:
    if value is None:
        return torch.full((n,), fill, dtype=torch.long)
    if isinstance(value, int):
        return torch.full((n,), value, dtype=torch.long)
    if not value:
        raise ValueError("an empty list of classes was given; give one class or a list to cycle through.")
    return torch.tensor([value[i % len(value)] for i in range(n)], dtype=torch.long)


#: most samples or evaluation rows a data module holds: each is an image the run generates, and
#: their columns are built in memory up front (10**12 rows would fail in the allocator)
MAX_ROWS = 1_000_000


def check_rows(option: str, n: int) -> None:
    """Refuse more than :data:`MAX_ROWS` rows in one sentence."""
    if n > MAX_ROWS:
        raise ValueError(f"{option} {n} is more than the {MAX_ROWS:,} a run can hold; give at most {MAX_ROWS:,} "
                         "(split a larger evaluation over several runs with --data.eval_seed).")


def eval_columns(num_samples: int, class_label: int | list[int] | None, prompt: str | list[str] | None, seed: int,
                 null_class: int, reference_class_label: int | list[int] | None = None) -> dict[str, Any] | None:
    """The evaluation rows: ``index`` (row number), ``seed`` (``seed + index``: the row's starting
    noise is ``torch.randn`` from a generator seeded with it), ``class_label`` and ``prompt``
    (cycled over the rows, when given), and ``reference_class_label`` (the class the base model's
    reference samples are drawn with, when given); None for ``num_samples`` 0."""
    if num_samples < 0:
        raise ValueError(f"eval_samples must be >= 0 (0: no evaluation set), got {num_samples}.")
    if seed < 0:
        raise ValueError(f"eval_seed must be >= 0, got {seed}.")
    if num_samples == 0:
        return None
    check_rows("eval_samples", num_samples)
    index = torch.arange(num_samples)
    columns: dict[str, Any] = {"index": index, "seed": index + seed,
                               "class_label": _per_sample(class_label, num_samples, null_class)}
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("an empty list of evaluation prompts was given; give one prompt or a list to cycle through.")
        columns["prompt"] = [prompts[i % len(prompts)] for i in range(num_samples)]
    if reference_class_label is not None:
        columns["reference_class_label"] = _per_sample(reference_class_label, num_samples, null_class)
    return columns


class _EvalBatches(IterableDataset):
    """This process's evaluation rows (``rank, rank + world_size, ...``) in batches of ``batch_size``."""

    def __init__(self, columns: dict[str, Any], batch_size: int, rank: int, world_size: int) -> None:
        self.rows = batch_rows(columns, shard(len(columns["index"]), rank, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.rows["index"]) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self.rows["index"])
        for start in range(0, n, self.batch_size):
            yield batch_rows(self.rows, torch.arange(start, min(start + self.batch_size, n)))
