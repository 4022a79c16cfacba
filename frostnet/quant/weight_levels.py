"""The integer levels of fake-quantized weights, which transition-rate scheduling
(:mod:`frostnet.optim.transition`) counts, and the grid they sit on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantizeBase

from .ewgs import EWGSFakeQuantize

__all__ = ["WeightQuantGrid", "bn_fold", "freeze_weight_quantizer", "weight_levels", "weight_quant_grid",
           "weight_quantized_modules"]


def weight_quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every QAT layer whose weight is fake-quantized (``weight_fake_quant``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantizeBase)
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


@dataclass(frozen=True)
class WeightQuantGrid:
    """The quantization grid of a layer's weight at one moment (detached copies).

    ``scale`` and ``zero_point`` broadcast against the weight; ``fold`` is the BN folding factor
    ``gamma / sqrt(running_var + eps)`` of a fused Conv-BN QAT layer (broadcast along dim 0), or
    None.
    """

    scale: Tensor
    zero_point: Tensor
    quant_min: int
    quant_max: int
    fold: Optional[Tensor]


def _weight_fake_quant_range(fq: nn.Module) -> tuple[int, int]:
    obs = getattr(fq, "activation_post_process", fq)
    return int(obs.quant_min), int(obs.quant_max)


@torch.no_grad()
def weight_quant_grid(module: nn.Module) -> WeightQuantGrid:
    """Snapshot of the grid ``module.weight_fake_quant`` last used, with the BN folding factor."""
    fq = module.weight_fake_quant
    weight = module.weight
    shape = [1] * weight.dim()
    scale = fq.scale.detach().clone().to(weight.dtype)
    zero_point = fq.zero_point.detach().clone().to(weight.dtype)
    if getattr(fq, "is_per_channel", False) and scale.numel() > 1:
        shape_c = list(shape)
        shape_c[fq.ch_axis] = -1
        scale, zero_point = scale.reshape(shape_c), zero_point.reshape(shape_c)
    else:
        scale, zero_point = scale.reshape(-1)[:1].reshape(shape), zero_point.reshape(-1)[:1].reshape(shape)
    fold = bn_fold(module)
    if fold is not None:
        shape_o = list(shape)
        shape_o[0] = -1
        fold = fold.reshape(shape_o)
    qmin, qmax = _weight_fake_quant_range(fq)
    return WeightQuantGrid(scale, zero_point, qmin, qmax, fold)


@torch.no_grad()
def bn_fold(module: nn.Module) -> Optional[Tensor]:
    r"""The BN folding factor :math:`\gamma / \sqrt{\sigma^2_{running} + \epsilon}` of a fused
    Conv-BN QAT layer (one value per output channel, a detached copy), or None for other layers."""
    bn = getattr(module, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().clone()


@torch.no_grad()
def weight_levels(module: nn.Module, grid: Optional[WeightQuantGrid] = None, weight: Optional[Tensor] = None) -> Tensor:
    r"""The integer level of every weight element on the grid of the weight fake quantizer.

    .. math::
        w_d = \mathrm{clamp}(\mathrm{round}(w \cdot f / s) + z, q_{min}, q_{max})

    with :math:`f` the BN folding factor of fused Conv-BN layers (1 otherwise), :math:`s, z` the
    scale and zero point in the fake quantizer's buffers (per channel or per tensor): the levels
    its last forward pass simulated, which are the integers INT8 conversion stores
    (:func:`frostnet.quant.convert` converts torch's fused quantizer with these buffers too).
    Returned as a float tensor of integers shaped like the weight.

    Args:
        module: a QAT layer with ``weight_fake_quant``.
        grid: the grid to use (default: the current one, :func:`weight_quant_grid`).
        weight: the latent weight to use (default: ``module.weight``).
    """
    grid = grid or weight_quant_grid(module)
    w = (module.weight if weight is None else weight).detach()
    if grid.fold is not None:
        w = w * grid.fold
    return torch.clamp(torch.round(w * (1.0 / grid.scale)) + grid.zero_point, grid.quant_min, grid.quant_max)


def freeze_weight_quantizer(module: nn.Module) -> None:
    """Stop the weight quantizer of a QAT layer from changing its grid.

    EWGS: the interval bounds stop training (``requires_grad=False``). Observer-based quantizers
    (torch's min/max, OCTAV): the observer is disabled, so the grid stays the one of the last
    forward pass (call after at least one forward pass).
    """
    fq = module.weight_fake_quant
    if isinstance(fq, EWGSFakeQuantize):
        for p in (fq.lower, fq.upper):
            if p is not None:
                p.requires_grad_(False)
    else:
        fq.disable_observer()
