"""Fusable building blocks shared by every model family."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..quant import fuse_modules

__all__ = ["ConvBNAct", "make_divisible", "check_image_input", "fuse_conv_bn_act", "init_weights"]


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never below ``min_value`` (default ``divisor``)
    and never more than 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> optional ReLU, stored as ``conv.0/1/2``.

    The ``conv.<i>`` layout is the one of the FrostNet authors' checkpoints, so their state dicts
    load without renaming. ``fuse_model`` fuses the triple (or pair) into one INT8 conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        *,
        groups: int = 1,
        dilation: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def fuse_groups(self) -> list[str]:
        """Names (relative to this module) that fuse into one quantized op."""
        return [f"conv.{i}" for i in range(len(self.conv))]


def fuse_conv_bn_act(model: nn.Module, is_qat: bool) -> None:
    """Fuse every :class:`ConvBNAct` inside ``model`` in place.

    Already-fused blocks (whose ``conv.1`` is no longer a BatchNorm2d) are skipped, so calling
    ``fuse_model`` twice is harmless.
    """
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.conv[1], nn.BatchNorm2d):
            fuse_modules(module, [module.fuse_groups()], is_qat=is_qat)


def check_image_input(x: torch.Tensor, in_channels: int, model_name: str) -> None:
    """Raise a clear error unless ``x`` is an (N, in_channels, H, W) floating-point batch: of the
    default dtype (float32) and finite when it is on the CPU."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name} expects a torch.Tensor of shape (N, {in_channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{model_name} expects a 4-D batch (N, {in_channels}, H, W), got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{model_name} was built for {in_channels} input channels, got {x.shape[1]} (input shape "
            f"{tuple(x.shape)}); build it with in_channels={x.shape[1]} or convert the images"
        )
    if not (x.is_floating_point() or x.is_quantized):
        raise TypeError(f"{model_name} expects a floating-point batch, got dtype {x.dtype}; convert with x.float() and normalize")
    if x.is_quantized:
        return
    # On the CPU (where every INT8 model runs) the models compute in the default dtype; any
    # other float dtype only fails deep inside a conv with torch's "Input type ... and bias type"
    # message. Half precision on a GPU is a legitimate choice (model.half()), so it is left alone.
    if x.device.type == "cpu" and x.dtype != torch.get_default_dtype():
        raise TypeError(f"{model_name} expects a {torch.get_default_dtype()} batch on the CPU, got dtype {x.dtype}; "
                        "convert it with x.float()")
    # An INT8 model quantizes NaN/inf to ordinary integers and returns finite, meaningless logits,
    # so they are refused here (tracing skips the data-dependent check: it would be frozen in).
    if x.device.type == "cpu" and not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{model_name} got {bad} NaN or infinite input values (shape {tuple(x.shape)}); an INT8 model "
                         "would turn them into ordinary numbers and predict garbage: fix the preprocessing that made them")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, unit BN, zero biases: the FrostNet reference init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
