"""The recipe's calls into the QAT methods: the qconfig of ``--qat-method`` at the simulated bit
widths, the 8-bit first/last layers (``--keep-8bit-ends``) and EWGS's delta estimate over several
batches."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from .args import method_args

__all__ = ["end_layers_qconfig", "method_qconfig", "quant_ranges", "refresh_ewgs_deltas"]


def refresh_ewgs_deltas(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], args: argparse.Namespace,
                        step: int, loss_of: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None) -> dict[str, float]:
    """Re-estimate every EWGS delta on the first ``--ewgs-batches`` of ``batches`` (EWGS Eqs. 8-10).

    ``--ewgs-samples`` Rademacher vectors per batch, per quantizer unless
    ``--no-ewgs-per-quantizer``. The vectors come from a generator seeded by ``--seed`` and the
    global ``step``, so a resumed run draws the same ones; the model's buffers and the global RNG
    are left as they were.

    Args:
        model: the EWGS-prepared model (not DDP-wrapped).
        batches: ``(input, target)`` pairs on the model's device, e.g. the current batch followed
            by the next ones of the epoch (only the first ``--ewgs-batches`` are read).
        args: the recipe flags.
        step: the global step (seeds the vectors).
        loss_of: ``loss_of(x, y)`` runs ``model`` on a batch and returns the training loss (the
            task's loss); default the cross-entropy of ``model(x)`` with ``--label-smoothing``.
    """
    m = method_args(args)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    if loss_of is None:
        def loss_of(x: torch.Tensor, y: Any) -> torch.Tensor:
            return F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
    closures = ((lambda x=x, y=y: loss_of(x, y)) for x, y in islice(batches, m["ewgs_batches"]))
    return quant.set_ewgs_deltas(model, closures, samples=m["ewgs_samples"], per_quantizer=m["ewgs_per_quantizer"],
                                 generator=gen)


def quant_ranges(args: argparse.Namespace) -> tuple[Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """The simulated (weight, activation) integer ranges of ``--weight-bits``/``--act-bits``
    (None = 8 bits: the backend's INT8 range)."""
    for name in ("weight_bits", "act_bits"):
        bits = getattr(args, name)
        if not 2 <= bits <= 8:
            raise ValueError(f"--{name.replace('_', '-')} must be in 2..8, got {bits}")
    w = None if args.weight_bits == 8 else (-(2 ** (args.weight_bits - 1)), 2 ** (args.weight_bits - 1) - 1)
    a = None if args.act_bits == 8 else (0, 2 ** args.act_bits - 1)
    return w, a


def _method_options(m: dict[str, Any]) -> dict[str, Any]:
    if m["qat_method"] == "octav":
        return {"gradient": m["octav_gradient"], "dynamic": m["octav_dynamic"],
                "calib_batches": m["octav_calib_batches"], "clipping": m["octav_clipping"]}
    return {}


def method_qconfig(args: argparse.Namespace, backend: str) -> Optional[Any]:
    """The QConfig of ``--qat-method`` for ``backend`` at the simulated bit widths, or None for
    ``ste`` (the default qconfig)."""
    m = method_args(args)
    if m["qat_method"] == "ste":
        return None
    wrange, arange = quant_ranges(args)
    return quant.get_method_qconfig(m["qat_method"], backend, weight_quant_range=wrange, act_quant_range=arange,
                                    **_method_options(m))


def end_layers_qconfig(args: argparse.Namespace, backend: str) -> Optional[Any]:
    """The 8-bit qconfig of ``--qat-method`` for the first and last layers with ``--keep-8bit-ends``
    (pass it to :class:`~frostnet.recipe.statassist.StatAssist` as ``end_qconfig``), else None."""
    m = method_args(args)
    if not m["keep_8bit_ends"]:
        return None
    return quant.get_method_qconfig(m["qat_method"], backend, **_method_options(m))
