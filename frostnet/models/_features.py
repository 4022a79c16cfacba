"""Plugging FrostNet feature taps into torchvision detection/segmentation heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = ["backbone_with_fpn"]


def backbone_with_fpn(
    model: nn.Module,
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    extra_blocks: Optional[ExtraFPNBlock] = None,
) -> BackboneWithFPN:
    """Wrap a FrostNet (classifier or ``features_only``) as a torchvision ``BackboneWithFPN``.

    Args:
        model: a float FrostNet; its ``feature_info`` names the tap modules.
        out_indices: taps to feed the FPN (1..4 = strides 4, 8, 16, 32).
        out_channels: FPN channels (``backbone.out_channels`` for torchvision detectors).
        extra_blocks: e.g. ``LastLevelP6P7`` for RetinaNet; default ``LastLevelMaxPool``.

    Example::

        backbone = backbone_with_fpn(frostnet.get_model("frostnet_small_1_0"))
        detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        raise TypeError(f"{type(model).__name__} has no feature_info; pass a FrostNet")
    bad = [i for i in out_indices if not 0 <= i < len(info)]
    if bad or not out_indices:
        raise ValueError(f"out_indices {tuple(out_indices)!r} must be taps 0..{len(info) - 1} of {[f['module'] for f in info]}")
    return_layers = {str(info[i]["module"]): str(k) for k, i in enumerate(out_indices)}
    in_channels = [int(info[i]["num_chs"]) for i in out_indices]  # type: ignore[call-overload]
    return BackboneWithFPN(model, return_layers, in_channels, out_channels, extra_blocks=extra_blocks)
