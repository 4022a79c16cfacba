"""Pieces shared by the segmentation families (``lraspp``, ``espnet``).

Everything here is quantizable in eager mode: the float modules carry their FloatFunctional
instances (one per call site, because each owns an activation observer after ``prepare``), so
the same module tree trains in FP32, fake-quantizes and converts to INT8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import FloatFunctional, fuse_modules, scalar_only
from ._layers import fuse_conv_bn_act

__all__ = [
    "HardSigmoid",
    "SqueezeExcite",
    "check_positive_int",
    "fuse_segmentation_model",
    "resize",
]


class HardSigmoid(nn.Module):
    """``relu6(x + 3) / 6`` as ``add_scalar(3) -> ReLU6 -> mul_scalar(1/6)``.

    The decomposition the quantization-friendly baselines use: every step has an INT8 kernel on
    x86 and qnnpack, so the gate stays in the quantized graph instead of forcing a dequantize.
    None of the three requantizes in INT8 (they move the zero point/scale of their input), so
    none may be observed in QAT either: ReLU6 is the functional op, not an ``nn.ReLU6`` module,
    which eager ``prepare_qat`` would give a fake-quantize of its own that the INT8 ReLU6 does
    not apply (the fake-quantized and INT8 gates then disagree).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shift = scalar_only(FloatFunctional())
        self.scale = scalar_only(FloatFunctional())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.mul_scalar(F.relu6(self.shift.add_scalar(x, 3.0)), 1.0 / 6.0)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool -> Linear-ReLU -> Linear -> hard-sigmoid gate, and the
    channel-wise product through a FloatFunctional ``mul`` (observed, so it converts to INT8)."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, squeeze_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(squeeze_channels, channels)
        self.gate = HardSigmoid()
        self.mul = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x).reshape(n, c)))))
        return self.mul.mul(x, s.reshape(n, c, 1, 1))

    def fuse(self, is_qat: bool) -> None:
        """Fuse ``fc1`` + ``relu`` into one Linear(ReLU); a second call is a no-op."""
        if isinstance(self.relu, nn.ReLU):  # fusion replaces it by nn.Identity
            fuse_modules(self, [["fc1", "relu"]], is_qat=is_qat)


def fuse_segmentation_model(model: nn.Module, is_qat: bool) -> None:
    """Fuse every Conv-BN(-ReLU) and every SE Linear-ReLU of ``model`` in place (idempotent)."""
    fuse_conv_bn_act(model, is_qat)
    for module in model.modules():
        if isinstance(module, SqueezeExcite):
            module.fuse(is_qat)


def resize(x: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W); a no-op when ``x`` already has that size.

    Resizing to the skip connection's size instead of a fixed x2 keeps odd input sizes working
    (stride-2 layers round up, so x2 would overshoot by one pixel).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if tuple(x.shape[-2:]) == (1, 1):
        # Bilinear from one pixel is a broadcast, in both align_corners modes. torch 2.14's
        # quantized upsampling kernels (bilinear and nearest) mix up the memory layout of a 1x1
        # map with several channels (NCHW and NHWC strides coincide there) and return channels
        # interleaved over pixels; expanding keeps INT8 models right on small inputs.
        return x.expand(*x.shape[:2], *size).contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` naming ``value`` unless it is a positive int (bools are rejected)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
