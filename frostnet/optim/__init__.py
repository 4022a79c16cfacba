"""Optimizer add-ons for INT8 training: GradBoost and transition-rate scheduling, each one wrapper
for any ``torch.optim`` optimizer."""

from frostnet.optim.combined import CombinedOptimizer
from frostnet.optim.gradboost import GB_RULES, PHASES, GradBoost
from frostnet.optim.transition import TR_SCHEDULES, SGDT, AdamT, AdamWT, TransitionRateScheduler

__all__ = ["CombinedOptimizer", "GB_RULES", "PHASES", "SGDT", "TR_SCHEDULES", "AdamT", "AdamWT", "GradBoost", "TransitionRateScheduler"]
