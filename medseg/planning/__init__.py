"""Planning: fingerprint a data set, then write a complete experiment config from it (``medseg plan``).

Planning reads data (``medseg.data``, ``medseg.io``) and writes a config; it never imports training.
"""

from medseg.data.folds import cross_validation_folds
from medseg.planning.fingerprint import Fingerprint, compute_fingerprint, load_fingerprint
from medseg.planning.planner import Plan, PlanOptions, plan_experiment, write_plan

__all__ = [
    "Fingerprint",
    "Plan",
    "PlanOptions",
    "compute_fingerprint",
    "cross_validation_folds",
    "load_fingerprint",
    "plan_experiment",
    "write_plan",
]
