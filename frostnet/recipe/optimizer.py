"""The recipe's optimizer and LR schedule: ``--opt`` wrapped for the QAT methods, ``--sched``.

Wrapper chain, innermost first: the ``--opt`` optimizer (weights, BN, biases); a
:class:`~frostnet.optim.TransitionRateScheduler` (``--talr``); with ``--qat-method ewgs`` a
:class:`~frostnet.optim.CombinedOptimizer` adding the interval bounds' own Adam
(``--ewgs-bound-opt adam``, the EWGS paper's); :class:`~frostnet.optim.GradBoost`
(``statassist+gradboost``) outermost. The loop steps, zeroes and checkpoints the outermost object
only; one LR scheduler anneals every group, each from its own initial lr.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import torch
from torch import nn

from ..optim import CombinedOptimizer, GradBoost, TransitionRateScheduler
from .args import method_args

__all__ = ["EWGS_GROUP", "build_optimizer", "build_scheduler", "fp_epochs"]

#: Index (in ``optimizer.param_groups``) of the group that receives the EWGS interval bounds at the
#: QAT switch: the two weight groups come first, then the bounds' group (in the bounds' own Adam
#: with ``--ewgs-bound-opt adam``, in the main optimizer with ``main``).
EWGS_GROUP = 2


def fp_epochs(args: argparse.Namespace) -> int:
    """Float epochs before the QAT switch: all of them for ``--mode fp``, none for ``qat*``."""
    if args.mode == "fp":
        return args.epochs  # never switches
    if args.mode in ("qat", "qat-finetune"):
        return 0
    if not 0 <= args.fp_epochs <= args.epochs:
        raise ValueError(f"--fp-epochs must be in 0..--epochs ({args.epochs}), got {args.fp_epochs}")
    return args.fp_epochs


def _base_optimizer(groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    if args.opt == "adam":
        return torch.optim.Adam(groups, lr=args.lr)
    if args.opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=args.lr, alpha=0.9, eps=args.rmsprop_eps, momentum=args.momentum)
    raise ValueError(f"unknown --opt {args.opt!r}; valid choices: sgd, adamw, adam, rmsprop")


def build_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: Optional[int] = None) -> torch.optim.Optimizer:
    """The optimizer of ``--opt``, wrapped for transition-rate scheduling (``--talr``), joined by
    the EWGS bounds' Adam (``--qat-method ewgs``) and wrapped in GradBoost (``statassist+gradboost``).

    Weight decay applies to conv/linear weights only, never to BN parameters or biases. With
    ``--qat-method ewgs`` an empty group for the interval bounds (``--ewgs-lr``, no weight decay)
    is added at index :data:`EWGS_GROUP`: in a separate :class:`torch.optim.Adam`
    (``--ewgs-bound-opt adam``, default, as the EWGS paper and its authors' code) or as a third
    group of the main optimizer (``main``, the recipe's earlier behaviour); the bounds join it when
    the model is prepared for QAT (:class:`~frostnet.recipe.statassist.StatAssist`).

    Args:
        model: the float model.
        args: the recipe flags.
        steps_per_epoch: needed by ``--talr`` (length of its target schedule).
    """
    methods = method_args(args)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    ewgs = methods["qat_method"] == "ewgs"
    bounds_group = {"params": [], "weight_decay": 0.0, "lr": methods["ewgs_lr"]}
    if ewgs and methods["ewgs_bound_opt"] == "main":
        groups.append(bounds_group)
    opt = _base_optimizer(groups, args)
    if methods["talr"]:
        if steps_per_epoch is None:
            raise ValueError("--talr needs steps_per_epoch (the length of the target transition-rate schedule)")
        qat_steps = max(1, (args.epochs - fp_epochs(args)) * steps_per_epoch)
        opt = TransitionRateScheduler(
            opt, target=methods["tr_target"], schedule=methods["tr_schedule"], total_steps=qat_steps,
            step_size=max(1, round(args.decay_epochs * steps_per_epoch)), gamma=args.decay_rate,
            rate_momentum=methods["tr_momentum"], eta=methods["tr_eta"], relative=methods["tr_relative"],
            calibration_steps=methods["tr_calibration_steps"])
    if ewgs and methods["ewgs_bound_opt"] == "adam":
        opt = CombinedOptimizer(opt, torch.optim.Adam([bounds_group], lr=methods["ewgs_lr"]))
    if args.mode == "statassist+gradboost":
        opt = GradBoost(opt, decay=args.gb_decay, clamp=args.gb_clamp, noise_decay=args.gb_noise_decay,
                        coin_toss=args.gb_coin_toss, seed=args.seed, fused=args.gb_fused, rule=args.gb_rule)
    return opt


def build_scheduler(opt: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LR multiplier for ``--sched`` over the whole run (both phases), applied to
    every parameter group (EWGS bounds included) relative to its own initial lr."""
    total = max(1, args.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        t = min(step, total) / total
        if args.sched == "cosine":
            return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if args.sched == "step":
            return args.decay_rate ** math.floor(step / steps_per_epoch / args.decay_epochs)
        if args.sched == "poly":
            return (1 - t) ** args.poly_power
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
