"""Built-in gradient modes: SDO and the baselines it is compared with."""

from sdo_lightning.gradient_modes.drtune import DRTune
from sdo_lightning.gradient_modes.full_backprop import FullBackprop
from sdo_lightning.gradient_modes.shortcut import ShortcutGradient
from sdo_lightning.gradient_modes.truncated import TruncatedBackprop

__all__ = ["DRTune", "FullBackprop", "ShortcutGradient", "TruncatedBackprop"]
