"""LatentOptimization's steps when its ``gradient_mode`` is a :class:`~sdo_lightning.searches.Search`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class SearchSteps:
    """The search half of :class:`~sdo_lightning.LatentOptimization` (a mixin of it: it reads the
    module's variable, target, objective and best-so-far buffers)."""

    @torch.no_grad()
    def _search_step(self, batch: dict[str, Any]) -> None:
        """One step of a :class:`~sdo_lightning.searches.Search`: score its candidates for this
        process's samples, log the best of them as a gradient step logs its images, count the
        step on the optimizer (no gradients: it changes nothing) and move each sample to its best
        candidate if that beats the lowest loss seen (the current point's)."""
        index = batch["index"]
        n = len(self.best_loss)
        rows = index.to(self.best_loss.device)
        fresh = torch.isinf(self.best_loss[rows])
        if bool(fresh.any()):
            # never scored, so still at the start: score the unoptimized samples (images exist already)
            start_losses = self.objective(self.initial_images[rows], self.objective_batch(batch, index, self.start_latent[rows]))
            self.check_losses(start_losses, len(rows))
            scored = torch.where(fresh, start_losses.to(self.best_loss.dtype), self.best_loss[rows])
            all_start = self._gather_rows(index, scored, n)
            seen = self._gather_rows(index, torch.ones_like(scored), n) > 0
            update = seen & torch.isinf(self.best_loss) & torch.isfinite(all_start)
            self.best_loss[update] = all_start[update]

        context = self.context
        candidates = self.search.propose(self.variable[rows].detach(), index, self.global_step, context)
        for candidate in candidates:
            self.target.project(candidate, rows)

        def score(candidate: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            inputs = self.target.trajectory_inputs(candidate, self.start_latent[rows], self.start_cond[index], context)
            images = self._generate(index, grad=False, inputs=inputs)
            losses = self.objective(images, self.objective_batch(batch, index, inputs[0]))
            self.check_losses(losses, len(images))
            return losses, images, {k: v.detach() for k, v in self.objective.terms.items()}

        best = self.search.best(candidates, score)
        best_loss, best_images, best_variable = best.loss, best.images, best.variable

        # the step's best candidates are what this step's network calls made: logged as a gradient
        # step logs the images it sampled
        self.log_terms(best_loss, _Terms(best.terms))
        if self.held_out_objective is not None:
            self.log("train/held_out", self.held_out_losses(best_images, batch).mean(), sync_dist=True)
        skipped = self.skipped_steps
        # counts the step (global_step, max_steps, checkpoints) and runs the non-finite check; with
        # no gradients the optimizer changes nothing
        self.optimizers().step()
        if self.skipped_steps == skipped:
            self._keep_best(index, best_loss, best_images, best_variable)
        self.log("train/best_loss", self.best_loss.mean())

    def _check_search_trainer(self) -> None:
        """A search steps without gradients: refuse the trainer settings that need one, in one
        sentence (Lightning's manual optimization would refuse some with its own error, and a
        gradient scaler would fail at the first step, having scaled nothing)."""
        trainer = self.trainer
        self.search.gradient_mode_at(0, trainer.max_steps)  # a search that splits the run checks max_steps
        problems = []
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            problems.append(f"precision {trainer.precision} (its gradient scaler)")
        if trainer.gradient_clip_val:
            problems.append(f"gradient_clip_val {trainer.gradient_clip_val}")
        if trainer.accumulate_grad_batches != 1:
            problems.append(f"accumulate_grad_batches {trainer.accumulate_grad_batches}")
        if problems:
            raise ValueError(
                f"{type(self.gradient_mode).__name__} searches without gradients, so it cannot run with "
                f"{' or '.join(problems)}: set trainer.precision 32, bf16-mixed or bf16-true, trainer.gradient_clip_val "
                "null and trainer.accumulate_grad_batches 1."
            )


class _Terms:
    """Stands in for the objective in :meth:`OptimizationModule.log_terms`: the chosen candidates' terms."""

    def __init__(self, terms: dict[str, Tensor]) -> None:
        self.terms = terms
