"""Refuse degenerate runs before any work starts.

Each of these used to train nothing (or nonsense) and exit 0: ``--batch-size`` larger than the
training set (``drop_last`` leaves 0 steps and the untrained weights are exported),
``--epochs 0``, ``--batch-size 0``, ``--lr nan``, ``--reset-head`` without ``--init`` (silently
ignored), ``--ckpt-interval-steps -1``, and an ImageFolder ``val/`` without images (top-1 0.0).
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

__all__ = ["validate_run_config"]


def validate_run_config(args: argparse.Namespace, train_size: int, *, eval_size: Optional[int] = None,
                        world: int = 1) -> None:
    """Raise ``ValueError`` naming the flag, its value and the fix for a run that cannot train.

    Call it after the datasets are indexed (their sizes are known) and before the model is built.

    Args:
        args: the recipe flags (``tools/train.py``).
        train_size: images in the (``--train-subset``) training set.
        eval_size: images in the evaluation split (``None``: not checked).
        world: the number of DDP processes (each takes ``batch_size / world`` images per step).
    """
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}"),
        (args.ckpt_interval_steps >= 0,
         f"--ckpt-interval-steps must be >= 0 (0 = checkpoint at epoch ends only), got {args.ckpt_interval_steps}"),
        (not args.reset_head or bool(args.init),
         "--reset-head starts the classifier of the --init weights anew, but no --init was given: pass --init "
         "<FP32 weights file>, or drop --reset-head (a model without --init has a fresh head anyway)"),
        (args.train_subset >= 0, f"--train-subset must be >= 0 (0 = all), got {args.train_subset}"),
        (args.eval_subset >= 0, f"--eval-subset must be >= 0 (0 = all), got {args.eval_subset}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.ema_decay == 0 or 0 < args.ema_decay < 1,
         f"--ema-decay must lie in (0, 1) (e.g. 0.999), or be 0 to turn the weight EMA off; got {args.ema_decay}"),
        (args.threads >= 0, f"--threads must be >= 0 (0 = torch default), got {args.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if train_size < 1:
        raise ValueError(f"the training set of --data {args.data!r} is empty: check the path and its train/ folder")
    if args.batch_size > train_size:
        subset = f" (--train-subset {args.train_subset})" if args.train_subset else ""
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set{subset}: {train_size} images "
                         f"give 0 full batches, so nothing would train; use --batch-size <= {train_size}")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"the evaluation split of --data {args.data!r} holds no images (every accuracy would read 0.0): "
                         "fill its folder (ImageFolder: val/<class>/*.JPEG) or pass --val-size N for a held-out split")
