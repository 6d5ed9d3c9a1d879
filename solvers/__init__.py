"""Built-in solvers: one diffusers scheduler per file, all sharing :class:`sdo_lightning.Solver`'s verbs."""

from sdo_lightning.solvers.ddim import DDIM
from sdo_lightning.solvers.dpm_solver import DPMSolverPlusPlus
from sdo_lightning.solvers.flow_match import FlowMatchEuler
from sdo_lightning.solvers.lcm import LCMMultistep

__all__ = ["DDIM", "DPMSolverPlusPlus", "FlowMatchEuler", "LCMMultistep"]
