"""Built-in searches (the ``searches`` plugin kind): gradient-free baselines that propose, score and
keep candidates; :class:`Search` is the contract (see :mod:`sdo_lightning.searches.base`)."""

from sdo_lightning.searches.base import Scored, Search, candidate_noise, candidate_seed
from sdo_lightning.searches.best_of_n import BestOfN
from sdo_lightning.searches.hybrid import SearchThenGradient
from sdo_lightning.searches.zero_order import ZeroOrder

#: the name of the searches' base class when they were given as gradient modes; kept for one release
SearchMode = Search

__all__ = ["BestOfN", "Scored", "Search", "SearchMode", "SearchThenGradient", "ZeroOrder", "candidate_noise", "candidate_seed"]
