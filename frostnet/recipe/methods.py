"""The recipe's calls into the QAT methods that need more than a qconfig: EWGS's delta estimate
over several batches and the 8-bit first/last layers (``--keep-8bit-ends``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from itertools import islice
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from .args import method_args

__all__ = ["end_layers_qconfig", "refresh_ewgs_deltas"]


def refresh_ewgs_deltas(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace,
                        step: int) -> dict[str, float]:
    """Re-estimate every EWGS delta on the first ``--ewgs-batches`` of ``batches`` (EWGS Eqs. 8-10).

    ``--ewgs-samples`` Rademacher vectors per batch, per quantizer unless
    ``--no-ewgs-per-quantizer``; the loss is the run's cross-entropy (with ``--label-smoothing``).
    The vectors come from a generator seeded by ``--seed`` and the global ``step``, so a resumed
    run draws the same ones; the model's buffers and the global RNG are left as they were.

    Args:
        model: the EWGS-prepared model (not DDP-wrapped).
        batches: ``(input, target)`` pairs on the model's device, e.g. the current batch followed
            by the next ones of the epoch (only the first ``--ewgs-batches`` are read).
        args: the recipe flags.
        step: the global step (seeds the vectors).
    """
    m = method_args(args)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return quant.estimate_ewgs_deltas(
        model, islice(batches, m["ewgs_batches"]),
        lambda out, y: F.cross_entropy(out, y, label_smoothing=args.label_smoothing),
        samples=m["ewgs_samples"], per_quantizer=m["ewgs_per_quantizer"], generator=gen)


def end_layers_qconfig(args: argparse.Namespace, backend: str) -> Optional[Any]:
    """The 8-bit qconfig of ``--qat-method`` for the first and last layers with ``--keep-8bit-ends``
    (pass it to :class:`~frostnet.recipe.statassist.StatAssist` as ``end_qconfig``), else None."""
    m = method_args(args)
    if not m["keep_8bit_ends"]:
        return None
    options: dict[str, Any] = {}
    if m["qat_method"] == "octav":
        options = {"gradient": m["octav_gradient"], "dynamic": m["octav_dynamic"],
                   "calib_batches": m["octav_calib_batches"]}
    return quant.get_method_qconfig(m["qat_method"], backend, **options)
