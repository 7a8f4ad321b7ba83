"""Objectives: what happens to a block of full rows of logits (see `base`).

One file per objective family; each implements `RowObjective`.
"""

from info_nce.objectives.base import RowContext, RowObjective
from info_nce.objectives.debiased import DebiasedObjective
from info_nce.objectives.decoupled import DecoupledObjective
from info_nce.objectives.infonce import InfoNCEObjective, mean_positive_logit
from info_nce.objectives.sigmoid import SigmoidObjective

__all__ = [
    "DebiasedObjective",
    "DecoupledObjective",
    "InfoNCEObjective",
    "RowContext",
    "RowObjective",
    "SigmoidObjective",
    "mean_positive_logit",
]
