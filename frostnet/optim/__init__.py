"""Optimizer add-ons for INT8 training: GradBoost, one wrapper for any ``torch.optim`` optimizer."""

from frostnet.optim.gradboost import PHASES, GradBoost

__all__ = ["GradBoost", "PHASES"]
