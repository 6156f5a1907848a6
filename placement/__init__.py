"""Pure planning: how a model is split across machines. No I/O, no clocks."""

from .cluster import parse_cluster, synthetic
from .errors import PlanError
from .planner import BACKEND_NAMES, STRATEGY_BY_NAME, STRATEGY_NAMES, plan
from .profile import profile

__all__ = [
    "BACKEND_NAMES", "STRATEGY_BY_NAME", "STRATEGY_NAMES", "PlanError",
    "parse_cluster", "plan", "profile", "synthetic",
]
