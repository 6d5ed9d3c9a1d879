"""Sampling: the one loop (:func:`sample`), Picard's parallel sweeps and inversion.

Imports the vocabulary (contracts) and nothing above it.
"""

from sdo_lightning.sampling.loop import Denoiser, Step, StepCallback, sample

__all__ = ["Denoiser", "Step", "StepCallback", "sample"]
