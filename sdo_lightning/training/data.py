"""Data modules: what each optimized sample is (its seed, conditioning and target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sdo_lightning import progress, registry
from sdo_lightning.training.eval_rows import (  # noqa: F401 (also imported from here)
    MAX_ROWS, _EvalBatches, _per_sample, check_rows, eval_columns,
)
from sdo_lightning.training.rows import batch_rows, shard  # noqa: F401 (also imported from here)


def _rank_and_world(trainer: Any) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def _steps_and_accumulation(trainer: Any) -> tuple[int, int]:
    max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
    accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
    return max_steps, accumulate


class _Repeat(IterableDataset):
    """Yields ``batch`` ``length`` times (one epoch holds every optimizer step).

    An iterable dataset, so Lightning never splits it with a DistributedSampler: the data modules
    here shard by rank themselves, with no padding and no duplicates.
    """

    def __init__(self, batch: dict[str, Any], length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.length):
            yield dict(self.batch)


class _PositionFreeLoader(DataLoader):
    """A loader whose batches do not depend on where iteration starts (every batch is the same, or
    is filled in from the trainer's step), so resuming mid-epoch is exact: its state is empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _load_images(source: str, n: int) -> torch.Tensor:
    if source == "digits":
        from sdo_lightning.digits import load_digits_images

        images = load_digits_images(16)[0]
    else:
        import numpy as np

        if not Path(source).is_file():
            raise FileNotFoundError(f"images={source!r} is not a file; expected 'digits' or a .npz file with an "
                                    "'images' array (N, C, H, W) in [0, 1].")
        try:
            images = torch.from_numpy(np.asarray(np.load(source)["images"])).float()
        except Exception as err:  # truncated, not an npz, no 'images' entry, an object array, ...
            raise ValueError(f"images={source!r} could not be read ({type(err).__name__}); expected a .npz file with "
                             "an 'images' array (N, C, H, W) in [0, 1].") from None
        if images.ndim != 4:
            raise ValueError(f"images={source!r} holds an array of shape {tuple(images.shape)}; expected (N, C, H, W).")
    if len(images) < n:
        raise ValueError(f"images={source!r} holds {len(images)} images, fewer than num_samples={n}.")
    return images[:n]


class _Samples(Dataset):
    """The sample set repeated ``repeats`` times, so one epoch holds every optimizer step."""

    def __init__(self, columns: dict[str, torch.Tensor], repeats: int = 1) -> None:
        self.columns = columns
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.columns["index"]) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = i % len(self.columns["index"])
        return {k: v[i] for k, v in self.columns.items()}


class _DataModule(LightningDataModule):
    """Base of the data modules here: subclasses are listed in the CLI's messages by class name.

    Validation, test and predict share one evaluation set of fixed rows (``eval_columns``, set by
    the subclass): held-out seeds and conditions. Without one, ``fit`` validates nothing and
    ``sdo validate`` / ``test`` / ``predict`` say how to give one.
    """

    eval_rows: dict[str, Any] | None = None
    eval_batch_size: int = 16
    #: the options that set the evaluation rows' conditions, for the messages
    eval_condition_options = "--data.eval_class_label / --data.eval_prompt"

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("data", cls)

    def _set_eval(self, columns: dict[str, Any] | None, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {batch_size}.")
        self.eval_rows, self.eval_batch_size = columns, batch_size

    def _eval_loader(self, what: str) -> DataLoader | list:
        trainer = getattr(self, "trainer", None)
        if self.eval_rows is None:
            if what == "val" and trainer is not None and trainer.state.fn == "fit":
                return []  # fit without an evaluation set: no validation
            command = {"val": "validate", "test": "test", "predict": "predict"}[what]
            raise ValueError(f"sdo {command} needs an evaluation set, and {type(self).__name__} has none: set "
                             f"--data.eval_samples N (with {self.eval_condition_options} for the conditions and "
                             "--data.eval_seed for the first seed).")
        rank, world_size = _rank_and_world(trainer)
        dataset = _EvalBatches(self.eval_rows, self.eval_batch_size, rank, world_size)
        # a generator of its own: a DataLoader draws its base seed at every iteration, and from the
        # global generator that would shift the training's random draws at every validation
        return DataLoader(dataset, batch_size=None, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("predict")


class SampleSet(_DataModule):
    """A set of samples to optimize, each one a seed, a class label and a target.

    Every optimizer step sees the whole set as one batch, so each sample's variables get one
    update per step (and Adam's state of one sample never moves another's). With several
    processes (DDP) each one sees its own shard, samples ``rank, rank + world_size, ...``.

    Args:
        num_samples: how many samples to optimize.
        class_label: conditioning class per sample: one class for all, a list cycled over the
            samples, or None for unconditional samples (the null class).
        target: target class per sample, for objectives that read ``batch["target"]``: one
            class, a list cycled over the samples, or None.
        prompt: text prompt per sample for text-conditioned backbones: one prompt for all, a
            list cycled over the samples, or None.
        images: real images to start from (``LatentOptimization(invert_images=True)`` inverts
            them with DDIM): ``digits`` for the bundled real digits (the first ``num_samples``,
            16x16), or a ``.npz`` file with an ``images`` array ``(N, C, H, W)`` in [0, 1].
        null_class: the label that means "no class".
        eval_samples: how many evaluation rows (held-out seeds) validation, test and predict
            generate; 0 for none (then ``fit`` does not validate).
        eval_class_label: conditioning class per evaluation row (one class, or a list cycled
            over the rows); None for the training ``class_label``.
        eval_prompt: text prompt per evaluation row (one, or a list cycled); None for the
            training ``prompt``.
        eval_seed: the first evaluation seed: row ``i`` starts from ``torch.randn`` seeded with
            ``eval_seed + i`` (never a training draw for the default).
        eval_batch_size: evaluation rows per batch.
        eval_reference_class_label: draw the base model's reference samples (fidelity, FID) of
            the evaluation rows with this class (one, or a list cycled) instead of the rows' own:
            e.g. 7 to compare a model fine-tuned to make 7s with the base model's 7s of the same
            seeds. None: the rows' classes.
    """

    def __init__(
        self,
        num_samples: int = 16,
        class_label: int | list[int] | None = None,
        target: int | list[int] | None = None,
        prompt: str | list[str] | None = None,
        images: str | None = None,
        null_class: int = 10,
        eval_samples: int = 0,
        eval_class_label: int | list[int] | None = None,
        eval_prompt: str | list[str] | None = None,
        eval_seed: int = 1000,
        eval_batch_size: int = 16,
        eval_reference_class_label: int | list[int] | None = None,
    ) -> None:
        super().__init__()
        self._set_eval(eval_columns(eval_samples, class_label if eval_class_label is None else eval_class_label,
                                    prompt if eval_prompt is None else eval_prompt, eval_seed, null_class,
                                    eval_reference_class_label), eval_batch_size)
        if self.eval_rows is not None and target is not None:
            self.eval_rows["target"] = _per_sample(target, eval_samples, null_class)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        check_rows("num_samples", num_samples)
        self.num_samples = num_samples
        columns = {
            "index": torch.arange(num_samples),
            "class_label": _per_sample(class_label, num_samples, null_class),
        }
        if target is not None:
            columns["target"] = _per_sample(target, num_samples, null_class)
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("an empty list of prompts was given; give one prompt or a list to cycle through.")
            columns["prompt"] = [prompts[i % len(prompts)] for i in range(num_samples)]
        if images is not None:
            columns["image"] = _load_images(images, num_samples)
        self.dataset = _Samples(columns)

    def full_batch(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """All samples as one batch (what every training step sees), tensors on ``device``."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.dataset.columns.items()}

    def shard_batch(self, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        """The samples process ``rank`` of ``world_size`` owns (see :func:`shard`), as one batch."""
        return batch_rows(self.full_batch(device), shard(self.num_samples, rank, world_size))

    def train_dataloader(self) -> DataLoader:
        # One batch per optimizer step, all in one epoch, so the progress bar counts steps.
        trainer = getattr(self, "trainer", None)
        max_steps, accumulate = _steps_and_accumulation(trainer)
        batches = max_steps * accumulate if max_steps and max_steps > 0 else 1
        rank, world_size = _rank_and_world(trainer)
        return _PositionFreeLoader(_Repeat(self.shard_batch(rank, world_size), batches), batch_size=None)


class PromptSet(_DataModule):
    """Prompts for fine-tuning: every optimizer step draws a new batch from a list of prompts.

    The draw is a pure function of ``seed`` and the optimizer step: the prompts are shuffled
    (a new permutation each time the list is used up) into one stream per step, and the
    ``batch_size * world_size * accumulate_grad_batches`` prompts of a step are its first ones,
    micro-batch ``k`` of process ``rank`` taking positions ``(k * world_size + rank) * batch_size``
    onwards. So a run on 2 processes sees exactly the prompts of a 1-process run with twice the
    batch, and a resumed run draws what an uninterrupted one would. Each row's ``index`` is its
    position in the step, which :class:`~sdo_lightning.modules.reward_finetuning.RewardFineTuning`
    uses (with the step) to seed that sample's starting noise.

    Batches hold ``prompt`` (a list of strings, what text-conditioned backbones read), ``index``
    and ``class_label`` (the null class, so the digits backbone samples unconditionally).

    Args:
        prompts: the prompts, e.g. the paper's 45 animal names.
        prompts_file: a text file with one prompt per line (blank lines and ``#`` comments skipped);
            its prompts follow ``prompts``.
        batch_size: prompts per process and micro-batch (the paper's reward LoRA: 16, with
            ``trainer.accumulate_grad_batches: 4``).
        template: a format string applied to every prompt, e.g. ``"a photo of a {}"``.
        seed: seed of the draws.
        null_class: the class label of every row (for class-conditional backbones).
        eval_samples: how many evaluation rows (held-out seeds) validation, test and predict
            generate; 0 for none (then ``fit`` does not validate).
        eval_prompts: the evaluation prompts, cycled over the rows (the template is applied);
            None for the training prompts.
        eval_seed: the first evaluation seed: row ``i`` starts from ``torch.randn`` seeded with
            ``eval_seed + i``.
        eval_batch_size: evaluation rows per batch.
    """

    eval_condition_options = "--data.eval_prompts"

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        batch_size: int = 16,
        template: str = "{}",
        seed: int = 0,
        null_class: int = 10,
        eval_samples: int = 0,
        eval_prompts: list[str] | None = None,
        eval_seed: int = 1000,
        eval_batch_size: int = 16,
    ) -> None:
        super().__init__()
        items = list(prompts or [])
        if prompts_file is not None:
            path = Path(prompts_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompts_file={prompts_file!r} does not exist; give a text file with one prompt per line.")
            lines = [line.strip() for line in path.read_text().splitlines()]
            items += [line for line in lines if line and not line.startswith("#")]
        if not items:
            raise ValueError("PromptSet has no prompts: give prompts: [...] or a prompts_file with one prompt per line.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if "{}" not in template:
            raise ValueError(f"template={template!r} has no '{{}}' where the prompt goes, e.g. 'a photo of a {{}}'.")
        self.prompts = [template.format(p) for p in items]
        self.batch_size = batch_size
        if eval_prompts is not None and not eval_prompts:
            raise ValueError("an empty list of evaluation prompts was given; give prompts or leave eval_prompts unset "
                             "for the training prompts.")
        held_out = [template.format(p) for p in eval_prompts] if eval_prompts else self.prompts
        self._set_eval(eval_columns(eval_samples, None, held_out, eval_seed, null_class), eval_batch_size)
        self.seed = seed
        self.null_class = null_class

    def step_prompts(self, step: int, count: int) -> list[str]:
        """The first ``count`` prompts of optimizer step ``step``'s stream."""
        g = torch.Generator().manual_seed(progress.prompt_draw_seed(self.seed, step))
        order: list[int] = []
        while len(order) < count:
            order += torch.randperm(len(self.prompts), generator=g).tolist()
        return [self.prompts[i] for i in order[:count]]

    def batch(self, step: int, micro_batch: int = 0, rank: int = 0, world_size: int = 1, accumulate: int = 1) -> dict[str, Any]:
        """The batch of process ``rank`` for micro-batch ``micro_batch`` of optimizer step ``step``."""
        per_step = self.batch_size * world_size * accumulate
        start = (micro_batch * world_size + rank) * self.batch_size
        prompts = self.step_prompts(step, per_step)[start:start + self.batch_size]
        return {
            "prompt": prompts,
            "index": torch.arange(start, start + self.batch_size),
            "class_label": torch.full((self.batch_size,), self.null_class, dtype=torch.long),
        }

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        max_steps, accumulate = _steps_and_accumulation(trainer)
        if not max_steps or max_steps < 1:
            raise ValueError("PromptSet draws prompts per optimizer step: set trainer.max_steps (e.g. 1000).")
        # Placeholders: the prompts are filled in by on_before_batch_transfer from the trainer's
        # step, so they never depend on where a (resumed) iteration started.
        return _PositionFreeLoader(_Repeat({"placeholder": torch.zeros(())}, max_steps * accumulate), batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not isinstance(batch, dict) or "placeholder" not in batch:
            return batch
        _, accumulate = _steps_and_accumulation(trainer)
        rank, world_size = _rank_and_world(trainer)
        return self.batch(trainer.global_step, progress.next_micro_batch(trainer), rank, world_size, accumulate)
