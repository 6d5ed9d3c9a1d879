"""The embedded default model: a tiny class-conditional diffusion UNet and a digit classifier,
both trained on scikit-learn's bundled digits (see :mod:`sdo_lightning.digits.train`).

Shipped weights live under :data:`WEIGHTS_DIR`: ``unet/`` (diffusers ``UNet2DModel``, class labels
0..9 plus the null class 10 for classifier-free guidance, working on images scaled to [-1, 1]),
``scheduler/`` (diffusers ``DDPMScheduler`` config) and ``classifier/`` (:class:`DigitClassifier`,
taking images in [0, 1]). :data:`FLOW_WEIGHTS_DIR` holds the same UNet trained as a rectified flow.
"""

from pathlib import Path

from sdo_lightning.digits.classifier import DigitClassifier
from sdo_lightning.digits.data import load_digits_images
from sdo_lightning.digits.judge import DigitsJudge

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
#: the rectified-flow UNet of the same data (``unet/``, ``scheduler/``: a FlowMatchEulerDiscreteScheduler
#: config); the classifier under WEIGHTS_DIR scores it too
FLOW_WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "flow_weights"

__all__ = ["DigitClassifier", "DigitsJudge", "FLOW_WEIGHTS_DIR", "WEIGHTS_DIR", "load_digits_images"]
