"""Built-in objectives: per-sample losses on images in [0, 1], lower is better."""

from sdo_lightning.objectives.aesthetic import AestheticEnsemble, AestheticScore
from sdo_lightning.objectives.checkpointed import Checkpointed
from sdo_lightning.objectives.classifier import ClassifierObjective
from sdo_lightning.objectives.clip import CLIPScore
from sdo_lightning.objectives.combine import WeightedSum
from sdo_lightning.objectives.fidelity import L1Fidelity, L2Fidelity
from sdo_lightning.objectives.hps import HPSv2Score
from sdo_lightning.objectives.image_classifier import ImageClassifierObjective
from sdo_lightning.objectives.image_reward import ImageRewardScore
from sdo_lightning.objectives.lpips import LPIPSFidelity
from sdo_lightning.objectives.noise_prior import NoiseNormPrior
from sdo_lightning.objectives.pickscore import PickScore
from sdo_lightning.objectives.remote import RemoteObjective
from sdo_lightning.objectives.style import CLIPStyleLoss

__all__ = [
    "AestheticEnsemble",
    "AestheticScore",
    "CLIPScore",
    "CLIPStyleLoss",
    "Checkpointed",
    "ClassifierObjective",
    "HPSv2Score",
    "ImageClassifierObjective",
    "ImageRewardScore",
    "L1Fidelity",
    "L2Fidelity",
    "LPIPSFidelity",
    "NoiseNormPrior",
    "PickScore",
    "RemoteObjective",
    "WeightedSum",
]
