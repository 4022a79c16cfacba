"""SSD box coding: offsets of a box from its prior, scaled by the variances (0.1, 0.2)."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_convert

__all__ = ["BoxCoder"]

# exp() of a wild width/height offset overflows; torchvision's detectors clamp at the same value.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


class BoxCoder:
    """Encode xyxy boxes against cxcywh priors and decode offsets back to xyxy.

    ``encode`` gives ``((g_c - p_c) / (v0 * p_wh), log(g_wh / p_wh) / v1)``, the SSD targets;
    ``decode`` inverts it. Priors and boxes share one coordinate frame (normalized to the image
    in this package).

    Args:
        variances: (center variance, size variance); SSD uses (0.1, 0.2).
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2)) -> None:
        if len(variances) != 2 or not all(v > 0 for v in variances):
            raise ValueError(f"variances must be two positive numbers (center, size), got {variances!r}")
        self.variances = (float(variances[0]), float(variances[1]))

    def encode(self, boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        """Offsets ``(..., 4)`` of xyxy ``boxes`` from cxcywh ``priors`` (same leading shape)."""
        g = box_convert(boxes, "xyxy", "cxcywh")
        center = (g[..., :2] - priors[..., :2]) / (self.variances[0] * priors[..., 2:])
        size = torch.log(g[..., 2:] / priors[..., 2:]) / self.variances[1]
        return torch.cat([center, size], dim=-1)

    def decode(self, offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        """xyxy boxes from ``offsets (..., 4)`` against cxcywh ``priors`` (broadcast)."""
        center = priors[..., :2] + offsets[..., :2] * self.variances[0] * priors[..., 2:]
        size = priors[..., 2:] * torch.exp((offsets[..., 2:] * self.variances[1]).clamp(max=_MAX_LOG_SCALE))
        return box_convert(torch.cat([center, size], dim=-1), "cxcywh", "xyxy")
