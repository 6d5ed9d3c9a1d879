"""Built-in searches: gradient-free baselines that propose, score and keep candidates."""

from sdo_lightning.searches.best_of_n import BestOfN, SearchMode, ZeroOrder, candidate_noise, candidate_seed

__all__ = ["BestOfN", "SearchMode", "ZeroOrder", "candidate_noise", "candidate_seed"]
