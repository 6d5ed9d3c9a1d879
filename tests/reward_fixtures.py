"""Helpers for objectives that score more than the images (test_rewards.py, test_contracts.py)."""

from sdo_lightning import Objective


class LatentFromImages(Objective, register=False):
    """``objective`` scoring ``images`` as if they were the trajectories' start latents
    (``batch["latent"]``): lets the image-based objective contract test check an objective
    that reads only the latent (per sample, finite, differentiable)."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, images, batch):
        loss = self.objective(images, {**batch, "latent": images})
        self.terms = self.objective.terms
        return loss
