"""Semantic segmentation: per-pixel cross-entropy (ignore index 255), mIoU and pixel accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...metrics import SegmentationMetric
from ..config import RunConfig
from .base import DenseTask

__all__ = ["SegmentationTask", "IGNORE_INDEX"]

#: Mask value that never counts, in the loss or in the metric.
IGNORE_INDEX = 255


def _logits(out: Any) -> torch.Tensor:
    # torchvision's segmentation models return {"out": logits}; frostnet's follow that
    return out["out"] if isinstance(out, dict) else out


class SegmentationTask(DenseTask):
    """``--data fashion_scenes[:opts]``, ``voc:<root>`` or ``cityscapes:<root>``."""

    name = "segmentation"
    report_keys = ("miou", "pixel_acc")

    def loss(self, model: nn.Module, x: torch.Tensor, y: Any, cfg: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        logits = _logits(model(x))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        n = float(y.shape[0])
        with torch.no_grad():
            valid = y != IGNORE_INDEX
            acc = (logits.argmax(1)[valid] == y[valid]).float().mean().item() if valid.any() else 0.0
        return loss, {"n": n, "loss": loss.item() * n, "pixel_acc": acc * n}

    def new_metric(self, num_classes: int) -> SegmentationMetric:
        if num_classes < 2:
            raise ValueError(f"a segmentation metric needs the number of classes (>= 2, background included), got {num_classes}")
        return SegmentationMetric(num_classes, ignore_index=IGNORE_INDEX)

    def eval_step(self, model: nn.Module, x: torch.Tensor, y: Any, metric: Any) -> None:
        metric.update(_logits(model(x)), y)
