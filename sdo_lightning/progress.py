"""Where a fit stands, and the seeds that follow from it.

Lightning's loop counters and its checkpoint internals are read here and nowhere else, so a
change in Lightning is mended in one file. The per-sample seeds live here too: each is a pure
function of the run's seed and the sample's place (its index, the optimizer step, the
micro-batch), so a sample's noise never depends on which others share its batch or process,
and a resumed run draws what an uninterrupted one would. The multipliers are primes
(100003, 1000003, 7919, 101) that keep the seeds of different samples, steps and streams apart.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

# -- Lightning's loop counters ---------------------------------------------------------------


def _batches(trainer: Any) -> Any:
    # batches fed to training_step over the whole fit (restored from a checkpoint on resume)
    return trainer.fit_loop.epoch_loop.batch_progress.total


def micro_batch(trainer: Any | None) -> int:
    """The micro-batch of the current optimizer step that ``training_step`` is working on
    (0 without gradient accumulation); valid from ``on_train_batch_start`` on."""
    if trainer is None or trainer.accumulate_grad_batches <= 1:
        return 0
    return (_batches(trainer).ready - 1) % trainer.accumulate_grad_batches


def next_micro_batch(trainer: Any) -> int:
    """The micro-batch the next batch is for, before Lightning counts it (in
    ``on_before_batch_transfer``)."""
    return _batches(trainer).ready % max(trainer.accumulate_grad_batches, 1)


def inside_step(trainer: Any) -> bool:
    """True while an optimizer step has begun and not finished: a batch started but not
    processed, or some but not all micro-batches of the step processed."""
    batches = _batches(trainer)
    return batches.started > batches.processed or bool(batches.processed % trainer.accumulate_grad_batches)


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint Lightning would write now, without the barrier of ``Trainer.save_checkpoint``
    (processes may be interrupted at different points), its loop counters rewound to the start of
    the current optimizer step (see :func:`rewind_to_step_boundary`)."""
    checkpoint: dict[str, Any] = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    rewind_to_step_boundary(checkpoint, trainer.accumulate_grad_batches)
    return checkpoint


def rewind_to_step_boundary(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Make the loop counters of a checkpoint written inside an optimizer step say "at the start
    of that step".

    Lightning saves its batch counters as they are; on resume it would run only the remaining
    micro-batches of the step (whose earlier gradients were never saved) and count micro-batches
    from an offset for the rest of the run. Rewound, the resumed run redoes the whole step, with
    the same micro-batches, noise and draws as an uninterrupted run.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    partial = progress["current"]["completed"] % max(accumulate, 1)
    for part in ("total", "current"):
        done = progress[part]["completed"] - partial
        progress[part].update(ready=done, started=done, processed=done, completed=done)


# -- the global random generators -------------------------------------------------------------


def global_rng_states() -> dict[str, Any]:
    """The states of the global generators objectives may draw from (torch, CUDA, numpy, random),
    in types a ``weights_only`` checkpoint load accepts."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


@contextmanager
def global_rng_unchanged() -> Iterator[None]:
    """Run a block whose random draws must not shift anyone else's (a held-out objective that
    augments): the global generators are put back as they were when it ends."""
    states = global_rng_states()
    try:
        yield
    finally:
        set_global_rng_states(states)


def set_global_rng_states(states: dict[str, Any]) -> None:
    """Put the global generators back where :func:`global_rng_states` found them."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- per-sample seeds ------------------------------------------------------------------------


def latent_noise_seed(seed: int, index: int) -> int:
    """LatentOptimization: the starting noise of sample ``index``."""
    return seed * 100003 + index


def latent_trajectory_seed(seed: int, index: int) -> int:
    """LatentOptimization: the noise a stochastic solver injects along sample ``index``'s
    optimized trajectory (the same every optimizer step, so the objective is a fixed function of
    the optimized variable)."""
    return seed * 100003 + 17 + 7919 * index


def latent_prefix_seed(seed: int, index: int) -> int:
    """LatentOptimization with an intermediate target: the noise a stochastic solver injects on
    the way from x_T down to x_t, a stream of its own (the optimized chain below x_t must not
    replay it)."""
    return seed * 100003 + 53 + 7919 * index


def finetune_sample_seed(seed: int, step: int, micro_batch: int, index: int) -> int:
    """RewardFineTuning: the starting noise of sample ``index`` of ``micro_batch`` in optimizer
    ``step``; its trajectory's injected noise uses this seed + 1."""
    key = (seed * 1_000_003 + step) * 101 + micro_batch
    return (key * 100_003 + int(index)) % (2**63 - 1)


def prompt_draw_seed(seed: int, step: int) -> int:
    """PromptSet: the shuffle that draws optimizer ``step``'s prompts."""
    return seed * 1_000_003 + step


def generators(seeds: list[int], device: torch.device | str | None = None) -> list[torch.Generator]:
    """One generator per seed (per sample), on ``device``."""
    return [torch.Generator(device or "cpu").manual_seed(s) for s in seeds]


def normal(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal rows, row ``i`` drawn on the CPU from ``seeds[i]``
    (the same numbers on every device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
