"""Built-in objectives: per-sample losses on images in [0, 1], lower is better."""

from sdo_lightning.objectives.classifier import ClassifierObjective
from sdo_lightning.objectives.clip import CLIPScore
from sdo_lightning.objectives.combine import WeightedSum
from sdo_lightning.objectives.fidelity import L2Fidelity

__all__ = ["CLIPScore", "ClassifierObjective", "L2Fidelity", "WeightedSum"]
